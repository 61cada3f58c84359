"""Mixture-of-LoRA linear layer: a frozen projection plus one LoRA pair per modality."""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchtune.modules.peft import AdapterModule

SHARED = "shared"


class MoLLinear(nn.Module, AdapterModule):
    """Linear layer with a frozen base weight and one low-rank adapter per modality.

    Token ``i`` of modality ``m`` gets ``y_i = W x_i + b + (alpha / r) B_m A_m dropout(x_i)``.
    A modality without an adapter gets ``W x_i + b``. In shared mode a single pair ``(A, B)``
    serves every token, which is torchtune's ``LoRALinear`` and the baseline MoL is compared with.

    All adapters are applied with two dense matmuls: the rows of every ``A_m`` are stacked, the
    low-rank activations of other modalities are zeroed per token, and the stacked ``B`` maps
    back. This keeps the graph free of data-dependent shapes, so torch.compile does not break or
    recompile on routing, and a token's loss reaches only its own modality's adapter.

    Args:
        in_dim (int): input dimension.
        out_dim (int): output dimension.
        modality_names (Sequence[str]): every modality of the model in modality-id order
            (``"text"`` first), so that id ``k`` in ``modality_ids`` means ``modality_names[k]``.
        adapter_modalities (Sequence[str]): modalities that get an adapter, or ``["shared"]``
            for one adapter shared by all tokens. Empty means a plain frozen projection.
        rank (int): LoRA rank ``r``.
        alpha (float): LoRA scaling numerator; the update is scaled by ``alpha / r``.
        dropout (float): dropout on the adapter input. Default: 0.0.
        use_bias (bool): whether the frozen base projection has a bias (Qwen 2's q, k, v). Default: False.

    Raises:
        ValueError: if an adapter modality is not in ``modality_names``, or rank is not positive.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        modality_names: Sequence[str],
        adapter_modalities: Sequence[str],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
    ):
        super().__init__()
        adapter_modalities = list(adapter_modalities)
        self.shared = adapter_modalities == [SHARED]
        unknown = [m for m in adapter_modalities if m not in modality_names and not self.shared]
        if unknown:
            raise ValueError(
                f"Invalid adapter modalities {unknown}: the model has {list(modality_names)} "
                f"(or use ['{SHARED}'] for one adapter shared by all modalities)."
            )
        if rank <= 0:
            raise ValueError(f"Invalid LoRA rank: {rank}. It must be positive.")

        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.adapter_names: List[str] = adapter_modalities
        # Modality ids served by each adapter, as Python ints so compiled graphs treat them as constants.
        self.adapter_ids: List[int] = [] if self.shared else [list(modality_names).index(m) for m in adapter_modalities]

        self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_dim), requires_grad=False) if use_bias else None
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.ModuleDict({m: nn.Linear(in_dim, rank, bias=False) for m in adapter_modalities})
        self.lora_b = nn.ModuleDict({m: nn.Linear(rank, out_dim, bias=False) for m in adapter_modalities})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the base weight like ``nn.Linear``, each ``A`` like torchtune's LoRA and each ``B`` to zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_dim)
            nn.init.uniform_(self.bias, -bound, bound)
        self.initialize_adapters()

    def initialize_adapters(self) -> None:
        """Reset every adapter so that the layer starts as the frozen projection (``B = 0``)."""
        for name in self.adapter_names:
            nn.init.kaiming_uniform_(self.lora_a[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b[name].weight)

    def adapter_params(self) -> List[str]:
        """Names of the adapter parameters, for torchtune's ``get_adapter_params``."""
        names = []
        for name in self.adapter_names:
            names += [f"lora_a.{name}.weight", f"lora_b.{name}.weight"]
        return names

    def forward(self, x: torch.Tensor, modality_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): input of shape ``[..., in_dim]``.
            modality_ids (Optional[torch.Tensor]): modality id of every token, shape ``x.shape[:-1]``.
                Required unless the layer is in shared mode or has no adapter.

        Returns:
            torch.Tensor: output of shape ``[..., out_dim]``.

        Raises:
            ValueError: if per-modality adapters exist and ``modality_ids`` is missing.
        """
        out = F.linear(x, self.weight, self.bias)
        if not self.adapter_names:
            return out
        x = self.dropout(x)
        if self.shared:
            adapter = self.lora_b[SHARED](self.lora_a[SHARED](x))
            return out + self.scaling * adapter
        if modality_ids is None:
            raise ValueError("MoLLinear with per-modality adapters needs modality_ids for every token.")

        stacked_a = torch.cat([self.lora_a[m].weight for m in self.adapter_names], dim=0)
        stacked_b = torch.cat([self.lora_b[m].weight for m in self.adapter_names], dim=1)
        low_rank = F.linear(x, stacked_a)
        low_rank = low_rank.unflatten(-1, (len(self.adapter_names), self.rank))
        # route[..., j] is 1 where the token belongs to the modality of adapter j.
        route = torch.stack([modality_ids == i for i in self.adapter_ids], dim=-1)
        low_rank = low_rank * route.unsqueeze(-1).to(low_rank.dtype)
        return out + self.scaling * F.linear(low_rank.flatten(-2), stacked_b)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}, "
            f"adapters={self.adapter_names}, bias={self.bias is not None}"
        )
