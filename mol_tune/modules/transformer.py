"""Modality-aware transformer layer and decoder."""

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchtune.modules import TransformerDecoder, TransformerSelfAttentionLayer
from torchtune.modules.attention_utils import _MaskType

from mol_tune.modules.attention import apply_projection
from mol_tune.modules.norm import ModalityRMSNorm
from mol_tune.modules.routing import ModalityRouter
from mol_tune.vocab import VocabularyLayout


def is_adapter_or_norm_parameter(name: str) -> bool:
    """Return whether a parameter name is a LoRA factor or a per-modality norm scale."""
    return ".lora_a." in name or ".lora_b." in name or ".scales." in name


def is_new_parameter(name: str) -> bool:
    """Return whether a state-dict key is added by MoL, so a pretrained checkpoint cannot provide it."""
    new_embedding_keys = ("tok_embeddings.new_weight", "tok_embeddings.projections.", "tok_embeddings.codebooks.")
    return ".lora_a." in name or ".lora_b." in name or name.startswith(new_embedding_keys)


def apply_norm(norm: nn.Module, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
    """Call a norm, passing the modality ids when it is a ``ModalityRMSNorm``."""
    if isinstance(norm, ModalityRMSNorm):
        return norm(x, modality_ids)
    return norm(x)


class MoLFeedForward(nn.Module):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)`` whose projections may be ``MoLLinear``.

    The attribute names match torchtune's ``FeedForward``, so pretrained keys load unchanged.
    """

    def __init__(self, *, gate_proj: nn.Module, down_proj: nn.Module, up_proj: nn.Module):
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj

    def forward(self, x: torch.Tensor, modality_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        gate = F.silu(apply_projection(self.w1, x, modality_ids))
        return apply_projection(self.w2, gate * apply_projection(self.w3, x, modality_ids), modality_ids)


class MoLTransformerLayer(TransformerSelfAttentionLayer):
    """Pre-norm decoder layer that routes every token through its modality's norms and adapters.

    ``h = x + attn(norm_m(x))`` then ``out = h + mlp(norm_m(h))``, where ``norm_m`` is the
    norm of token ``i``'s modality and the projections inside ``attn`` (and ``mlp``, if it is a
    ``MoLFeedForward``) are ``MoLLinear``. Takes ``TransformerSelfAttentionLayer``'s arguments.
    """

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: Optional[_MaskType] = None,
        input_pos: Optional[torch.Tensor] = None,
        modality_ids: Optional[torch.Tensor] = None,
        **kwargs: Dict,
    ) -> torch.Tensor:
        h = apply_norm(self.sa_norm, x, modality_ids)
        attn_out = self.attn(h, h, mask=mask, input_pos=input_pos, modality_ids=modality_ids)
        h = self.sa_scale(attn_out) + x

        mlp_in = apply_norm(self.mlp_norm, h, modality_ids)
        if isinstance(self.mlp, MoLFeedForward):
            mlp_out = self.mlp(mlp_in, modality_ids)
        else:
            mlp_out = self.mlp(mlp_in)
        return h + self.mlp_scale(mlp_out)


class MoLTransformerDecoder(TransformerDecoder):
    """torchtune decoder that computes each token's modality once and passes it to every layer.

    Routing happens in ``forward`` from the token ids (``ModalityRouter``), so the ids are a
    plain tensor argument of every layer: no module state, so it works with batches, packed
    sequences and KV-cache decoding alike, and torch.compile sees them as a graph input.

    Args:
        layout (VocabularyLayout): token id ranges of text, codes and delimiters.
        **kwargs: ``TransformerDecoder`` arguments. ``tok_embeddings`` is a ``MultimodalEmbedding``.
    """

    def __init__(self, *, layout: VocabularyLayout, **kwargs: Any):
        super().__init__(**kwargs)
        self.layout = layout
        self.router = ModalityRouter(layout)
        # Set by the model builders: the builder's import path and arguments, to rebuild the model.
        self.build_config: Dict[str, Any] = {}

    def set_trainable(self, embedding_training: str = "all") -> None:
        """Freeze the pretrained weights; train adapters, per-modality norms and embeddings per mode.

        Args:
            embedding_training (str): ``"all"``, ``"new"`` or ``"none"``, see ``MultimodalEmbedding``.
        """
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_adapter_or_norm_parameter(name))
        self.tok_embeddings.set_training_mode(embedding_training)

    def load_base_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load a pretrained torchtune-format state dict (as ``FullModelHFCheckpointer`` returns it).

        ``tok_embeddings.weight`` becomes the text rows of the extended table, each pretrained
        RMSNorm scale is copied into every modality's scale, and the projections keep their keys.
        A tied ``output.weight`` is dropped. Adapters, appended rows, projections and codebooks are
        left as they are.

        Raises:
            ValueError: if a pretrained key has no place in this model, a base weight is missing,
                or the checkpoint has an output head that differs from its embeddings (untied).
        """
        modality_norms = {name for name, m in self.named_modules() if isinstance(m, ModalityRMSNorm)}
        mapped: Dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            prefix, _, leaf = key.rpartition(".")
            if key == "tok_embeddings.weight":
                mapped["tok_embeddings.text_weight"] = value
            elif key == "output.weight":
                embeddings = state_dict.get("tok_embeddings.weight")
                if embeddings is None or not torch.equal(value, embeddings):
                    raise ValueError(
                        "Invalid base checkpoint: it has an output head (output.weight) that differs from "
                        "tok_embeddings.weight. MoL models tie the head to the embeddings; untied "
                        "models are not supported."
                    )
            elif leaf == "scale" and prefix in modality_norms:
                for name in self.layout.modality_names:
                    mapped[f"{prefix}.scales.{name}"] = value
            else:
                mapped[key] = value

        missing, unexpected = self.load_state_dict(mapped, strict=False)
        missing_base = [k for k in missing if not is_new_parameter(k)]
        if unexpected or missing_base:
            raise ValueError(
                f"Base checkpoint does not fit this model: unexpected keys {unexpected[:8]}, missing "
                f"keys {missing_base[:8]} ({len(unexpected)} and {len(missing_base)} in all). Check that "
                "the builder matches the checkpoint's architecture (layers, heads, widths)."
            )

    def validate_tokens(self, tokens: torch.Tensor) -> None:
        """Raise ValueError naming the first token id outside ``[0, vocab_size)`` and its position."""
        vocab_size = self.layout.vocab_size
        invalid = (tokens < 0) | (tokens >= vocab_size)
        if invalid.any():
            position = tuple(int(i) for i in invalid.nonzero()[0])
            raise ValueError(
                f"Invalid token id {int(tokens[position])} at position {position}: the vocabulary has "
                f"{vocab_size} ids ({self.layout.base_vocab_size} text, then codes of "
                f"{[m.name for m in self.layout.modalities]} and delimiters). Check that the data was "
                "tokenized for this model's vocabulary layout."
            )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: Optional[_MaskType] = None,
        encoder_input: Optional[torch.Tensor] = None,
        encoder_mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        modality_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            tokens (torch.Tensor): token ids ``[b, s]``.
            mask (Optional[_MaskType]): attention mask as in torchtune, True where a query may
                attend to a key; None means causal. Packed sequences pass a per-document mask.
            encoder_input (Optional[torch.Tensor]): unused; kept for torchtune's signature.
            encoder_mask (Optional[torch.Tensor]): unused; kept for torchtune's signature.
            input_pos (Optional[torch.Tensor]): position ids ``[b, s]``.
            modality_ids (Optional[torch.Tensor]): precomputed modality ids ``[b, s]``; computed
                from ``tokens`` when None.

        Returns:
            torch.Tensor: logits ``[b, s, vocab_size]`` in float32, or a list of chunks when
            ``set_num_output_chunks`` was called.

        Raises:
            ValueError: if a token id is outside the vocabulary (checked outside torch.compile).
        """
        if not torch.compiler.is_compiling():
            self.validate_tokens(tokens)
        self._validate_inputs(tokens.shape[1], mask=mask, input_pos=input_pos)
        if modality_ids is None:
            modality_ids = self.router(tokens)

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=input_pos, modality_ids=modality_ids)
        return self.unembed(h)
