"""Vocabulary extension: embeddings for the codes and delimiters appended to a text model."""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mol_tune.vocab import VocabularyLayout

EMBEDDING_TRAINING_MODES = ("all", "new", "none")


class MultimodalEmbedding(nn.Module):
    """Token embedding table of a text model extended with modality codes and delimiters.

    The table is split in two parameters so that the pretrained rows can be frozen on their own:
    ``text_weight`` holds the base vocabulary rows, ``new_weight`` the appended rows (codes of
    every modality, then the delimiters, in ``VocabularyLayout`` order). The embedding of code
    ``k`` of modality ``m`` is ``new_weight[row] + P_m c_k``, with ``c_k`` the tokenizer's frozen
    codebook vector and ``P_m`` a trainable projection to the model width. The same rows serve as
    the tied output head (``logits``), so the model can generate codes.

    Args:
        layout (VocabularyLayout): token id ranges.
        embed_dim (int): model width.
    """

    def __init__(self, layout: VocabularyLayout, embed_dim: int):
        super().__init__()
        self.layout = layout
        self.embed_dim = embed_dim
        self.text_weight = nn.Parameter(torch.empty(layout.base_vocab_size, embed_dim))
        self.new_weight = nn.Parameter(torch.zeros(layout.num_new_tokens, embed_dim))
        self.projections = nn.ModuleDict(
            {m.name: nn.Linear(m.codebook_dim, embed_dim, bias=False) for m in layout.modalities}
        )
        # Codebooks are buffers: they come from the data's tokenizer and are saved with the adapters.
        self.codebooks = nn.Module()
        for m in layout.modalities:
            self.codebooks.register_buffer(m.name, torch.zeros(m.num_codes, m.codebook_dim))
        nn.init.normal_(self.text_weight)

    @property
    def weight(self) -> torch.Tensor:
        """The full ``[vocab_size, embed_dim]`` table. Materialises a copy; prefer ``forward``/``logits``."""
        return torch.cat([self.text_weight, self.new_rows()], dim=0)

    def set_codebook(self, name: str, codebook: torch.Tensor) -> None:
        """Store the frozen codebook ``[num_codes, codebook_dim]`` of modality ``name``.

        Raises:
            ValueError: if the shape differs from the modality's ``num_codes`` and ``codebook_dim``.
        """
        modality = self.layout.modality(name)
        expected = (modality.num_codes, modality.codebook_dim)
        if tuple(codebook.shape) != expected:
            raise ValueError(
                f"Invalid codebook for modality {name!r}: shape {tuple(codebook.shape)}, expected {expected} "
                "(num_codes, codebook_dim). The model's modality settings must match the data's tokenizer."
            )
        buffer = getattr(self.codebooks, name)
        with torch.no_grad():
            buffer.copy_(codebook.to(buffer.dtype))

    def new_rows(self) -> torch.Tensor:
        """Embeddings of all appended tokens, ``[num_new_tokens, embed_dim]``."""
        projected = [self.projections[m.name](getattr(self.codebooks, m.name)) for m in self.layout.modalities]
        num_delimiters = 2 * len(self.layout.modalities)
        delimiters = self.new_weight.new_zeros(num_delimiters, self.embed_dim)
        return self.new_weight + torch.cat(projected + [delimiters], dim=0).to(self.new_weight.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        base = self.layout.base_vocab_size
        is_text = (tokens < base).unsqueeze(-1)
        text = F.embedding(tokens.clamp(max=base - 1), self.text_weight)
        if self.layout.num_new_tokens == 0:
            return text
        new = F.embedding((tokens - base).clamp(min=0), self.new_rows())
        return torch.where(is_text, text, new)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output head: scores of every vocabulary id, ``[..., vocab_size]``."""
        text = F.linear(h, self.text_weight)
        if self.layout.num_new_tokens == 0:
            return text
        return torch.cat([text, F.linear(h, self.new_rows())], dim=-1)

    @torch.no_grad()
    def initialize_new_embeddings(self, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        """Initialise the appended rows from the codebooks, matched to the pretrained text embeddings.

        Call after the pretrained ``text_weight`` and the codebooks are loaded. With ``mu`` the mean
        text embedding and ``sigma`` the root mean square distance of text embeddings from ``mu``:

        - ``P_m`` is Gaussian, scaled so that the centred projected codes ``P_m (c_k - mean_k c_k)``
          have root mean square norm ``sigma``. Code rows start at
          ``mu + P_m (c_k - mean_k c_k)``: centred on the text cloud, as spread out as text, and
          arranged as the codebook is, so codes that decode alike start close together.
        - Delimiter rows start at ``mu`` plus Gaussian noise of the same per-dimension spread.

        Matching the text statistics keeps the new tokens' logits in the range of the text
        logits at the first step, so neither side dominates the softmax of the tied head.

        Returns:
            Dict[str, float]: the measured ``text_mean_norm`` and ``text_rms_spread`` (``sigma``).
        """
        text = self.text_weight.float()
        mean = text.mean(dim=0)
        spread = (text - mean).pow(2).sum(dim=-1).mean().sqrt()
        device = self.new_weight.device

        row = 0
        for m in self.layout.modalities:
            codebook = getattr(self.codebooks, m.name).float()
            centred = codebook - codebook.mean(dim=0)
            projection = torch.randn(self.embed_dim, m.codebook_dim, generator=generator).to(device)
            projected_norm = F.linear(centred, projection).pow(2).sum(dim=-1).mean().sqrt()
            if projected_norm > 0:
                projection *= spread / projected_norm
            self.projections[m.name].weight.copy_(projection)
            # new_weight holds mu - P_m mean(c), so new_weight + P_m c_k = mu + P_m (c_k - mean(c)).
            offset = mean - F.linear(codebook.mean(dim=0), projection)
            self.new_weight[row : row + m.num_codes] = offset
            row += m.num_codes

        num_delimiters = self.layout.num_new_tokens - row
        noise = torch.randn(num_delimiters, self.embed_dim, generator=generator).to(device)
        self.new_weight[row:] = mean + noise * spread / self.embed_dim**0.5
        return {"text_mean_norm": mean.norm().item(), "text_rms_spread": spread.item()}

    def set_training_mode(self, mode: str) -> None:
        """Choose what trains: ``"all"`` rows and projections, only the ``"new"`` ones, or ``"none"``.

        Raises:
            ValueError: if ``mode`` is not one of ``EMBEDDING_TRAINING_MODES``.
        """
        if mode not in EMBEDDING_TRAINING_MODES:
            raise ValueError(f"Invalid embedding_training: {mode!r}. Use one of {EMBEDDING_TRAINING_MODES}.")
        self.text_weight.requires_grad_(mode == "all")
        self.new_weight.requires_grad_(mode != "none")
        for projection in self.projections.values():
            projection.weight.requires_grad_(mode != "none")

    def extra_repr(self) -> str:
        return f"base_vocab_size={self.layout.base_vocab_size}, new_tokens={self.layout.num_new_tokens}, embed_dim={self.embed_dim}"


class TiedMultimodalHead:
    """Output head that shares its weights with a ``MultimodalEmbedding``.

    A plain callable, not a module, so the shared rows appear once in the state dict
    (the same reason torchtune's ``TiedLinear`` is not a module).
    """

    def __init__(self, embedding: MultimodalEmbedding):
        self.embedding = embedding

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(h)
