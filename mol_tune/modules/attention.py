"""Modality-aware self-attention: torchtune's attention with MoL projections."""

from typing import Optional

import torch
from torch import nn

from torchtune.modules import MultiHeadAttention
from torchtune.modules.attention_utils import _MaskType

from mol_tune.modules.mol_linear import MoLLinear


def apply_projection(projection: nn.Module, x: torch.Tensor, modality_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Call a projection, passing the modality ids when it is a ``MoLLinear``."""
    if isinstance(projection, MoLLinear):
        return projection(x, modality_ids)
    return projection(x)


class MoLMultiHeadAttention(MultiHeadAttention):
    """Grouped-query self-attention whose q, k, v and output projections may be ``MoLLinear``.

    Only the projections are modality-aware: attention scores are computed over the whole
    sequence, so tokens of every modality attend to each other. Positional embeddings,
    q/k norms, the KV-cache and the attention kernel are torchtune's ``MultiHeadAttention``.
    Takes the same constructor arguments.
    """

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[_MaskType] = None,
        input_pos: Optional[torch.Tensor] = None,
        modality_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): queries' input, ``[b, s_x, d]``.
            y (Optional[torch.Tensor]): keys' and values' input, ``[b, s_y, d]``; ``x`` for
                self-attention. May be None only when reading a filled KV-cache.
            mask (Optional[_MaskType]): as in torchtune, True where a query may attend to a key.
            input_pos (Optional[torch.Tensor]): position ids ``[b, s_x]``.
            modality_ids (Optional[torch.Tensor]): modality id of every token of ``x``, ``[b, s_x]``.
                In self-attention ``y`` is ``x``, so the same ids route k and v.

        Returns:
            torch.Tensor: ``[b, s_x, d]``.

        Raises:
            ValueError: if ``y`` is None and no KV-cache is enabled.
        """
        b, s_x, _ = x.shape
        q_per_kv = self.num_heads // self.num_kv_heads

        q = apply_projection(self.q_proj, x, modality_ids)
        q = q.view(b, s_x, self.num_kv_heads * q_per_kv, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)

        if y is None:
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k = self.kv_cache.k_cache
            v = self.kv_cache.v_cache
        else:
            s_y = y.shape[1]
            k = apply_projection(self.k_proj, y, modality_ids).view(b, s_y, -1, self.head_dim)
            v = apply_projection(self.v_proj, y, modality_ids).view(b, s_y, -1, self.head_dim)
            if self.pos_embeddings is not None:
                k = self.pos_embeddings(k, input_pos=input_pos)
            k = k.transpose(1, 2)
            v = v.transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)

        # Grouped-query attention: repeat each key/value head for its group of query heads.
        if self.num_heads != self.num_kv_heads:
            expand_shape = (b, self.num_kv_heads, q_per_kv, -1, self.head_dim)
            k = k.unsqueeze(2).expand(expand_shape).flatten(1, 2)
            v = v.unsqueeze(2).expand(expand_shape).flatten(1, 2)

        output = self._attention_call(
            q,
            k,
            v,
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.kv_cache is None and mask is None and self.is_causal,
        )
        output = output.transpose(1, 2).contiguous().view(b, s_x, -1)
        return apply_projection(self.output_proj, output, modality_ids)
