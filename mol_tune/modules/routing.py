"""Routing: the modality of every token, computed from its token id."""

import torch
from torch import nn

from mol_tune.vocab import VocabularyLayout


class ModalityRouter(nn.Module):
    """Map token ids to modality ids using the vocabulary layout.

    Text ids and delimiters map to 0; the codes of ``layout.modalities[k]`` map to ``k + 1``.
    The id ranges are Python ints, so a compiled graph holds them as constants and the ids of
    a new sequence length do not trigger a recompile. The router has no parameters or state,
    so the same token always routes the same way, in training, batched or KV-cache decoding.

    Args:
        layout (VocabularyLayout): token id ranges of the model.
    """

    def __init__(self, layout: VocabularyLayout):
        super().__init__()
        self.layout = layout
        self.code_ranges = layout.code_ranges()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens (torch.Tensor): token ids of any shape.

        Returns:
            torch.Tensor: modality ids, same shape and device as ``tokens``, dtype long.
        """
        modality_ids = torch.zeros_like(tokens, dtype=torch.long)
        for modality_id, (start, end) in enumerate(self.code_ranges, start=1):
            modality_ids = modality_ids.masked_fill((tokens >= start) & (tokens < end), modality_id)
        return modality_ids

    def extra_repr(self) -> str:
        return f"modalities={self.layout.modality_names}, code_ranges={self.code_ranges}"
