"""Optimizer parameter groups: one per modality's adapters and norms, plus a base group."""

import math
from typing import Any, Dict, List, Mapping

from torch import nn

BASE_GROUP = "base"


def parameter_group_name(name: str) -> str:
    """Return the group of a trainable parameter: the modality of an adapter or norm, else ``base``.

    ``layers.3.attn.q_proj.lora_a.image.weight`` -> ``image``;
    ``layers.3.sa_norm.scales.text`` -> ``text``; ``tok_embeddings.new_weight`` -> ``base``.
    In shared-adapter mode the adapters form the group ``shared``.
    """
    for marker in (".lora_a.", ".lora_b."):
        if marker in name:
            return name.split(marker, 1)[1].split(".", 1)[0]
    if ".scales." in name:
        return name.rsplit(".scales.", 1)[1]
    return BASE_GROUP


def build_param_groups(
    model: nn.Module, learning_rates: Mapping[str, float], weight_decay: float = 0.0
) -> List[Dict[str, Any]]:
    """Group the trainable parameters by modality, each group with its own learning rate.

    Args:
        model (nn.Module): the MoL model.
        learning_rates (Mapping[str, float]): learning rate per group name (``base``, ``text``,
            ``image``, ..., or ``shared``). A ``default`` entry serves groups without their own.
        weight_decay (float): AdamW weight decay of every group. Default: 0.0.

    Returns:
        List[Dict[str, Any]]: groups for a torch optimizer, each with ``name``, ``params``, ``lr``
        and ``weight_decay``, in a fixed order (``base`` first, then by name).

    Raises:
        ValueError: if a learning rate is negative or not a number, names a group the model does
            not have, or a group has no learning rate and there is no ``default``.
    """
    params: Dict[str, List[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            params.setdefault(parameter_group_name(name), []).append(parameter)

    rates = {}
    for group, value in dict(learning_rates).items():
        try:
            rate = float(value)
        except (TypeError, ValueError):
            rate = float("nan")
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"Invalid lr.{group}: {value!r}. A learning rate is a finite number >= 0.")
        rates[str(group)] = rate
    unknown = sorted(set(rates) - set(params) - {"default"})
    if unknown:
        raise ValueError(
            f"Invalid learning rate for {unknown}: the model has no trainable parameters in that group. "
            f"Its groups are {sorted(params)}; remove the entry or add the modality to the model."
        )
    missing = sorted(g for g in params if g not in rates and "default" not in rates)
    if missing:
        raise ValueError(f"Missing learning rate for the groups {missing}: add them to `lr` or give `lr.default`.")

    order = sorted(params, key=lambda g: (g != BASE_GROUP, g))
    return [
        {"name": g, "params": params[g], "lr": rates.get(g, rates.get("default")), "weight_decay": weight_decay}
        for g in order
    ]
