"""RMSNorm with one learned scale per modality."""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ModalityRMSNorm(nn.Module):
    """RMSNorm whose scale depends on the token's modality.

    ``y_i = x_i / sqrt(mean(x_i^2) + eps) * g_m`` for a token of modality ``m``. Every ``g_m``
    starts as a copy of the pretrained norm's scale (see ``load_pretrained_scale``), so the
    layer first behaves as the pretrained norm for every modality. The arithmetic follows
    torchtune's ``RMSNorm``: normalise in float32, cast back, then scale.

    Args:
        dim (int): feature dimension.
        modality_names (Sequence[str]): every modality, in modality-id order.
        eps (float): added to the mean square for stability. Default: 1e-6.
    """

    def __init__(self, dim: int, modality_names: Sequence[str], eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.modality_names = list(modality_names)
        self.scales = nn.ParameterDict({m: nn.Parameter(torch.ones(dim)) for m in self.modality_names})

    def load_pretrained_scale(self, scale: torch.Tensor) -> None:
        """Copy a pretrained RMSNorm scale of shape ``[dim]`` into every modality's scale."""
        if scale.shape != (self.dim,):
            raise ValueError(f"Invalid RMSNorm scale shape {tuple(scale.shape)}: expected ({self.dim},).")
        with torch.no_grad():
            for parameter in self.scales.values():
                parameter.copy_(scale)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): input of shape ``[b, s, dim]``.
            modality_ids (torch.Tensor): modality id of every token, shape ``[b, s]``.

        Returns:
            torch.Tensor: normalised input, same shape and dtype as ``x``.
        """
        x_fp32 = x.float()
        normed = (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        scale_table = torch.stack([self.scales[m] for m in self.modality_names])
        return normed * F.embedding(modality_ids, scale_table)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, modalities={self.modality_names}"
