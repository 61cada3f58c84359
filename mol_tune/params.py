"""Count a model's trainable and total parameters per group, and the ``mol-tune params`` command.

Groups come from parameter names, so any ``nn.Module`` can be counted:

- ``embeddings``: ``tok_embeddings.*`` (for MoL: text rows, new rows and codebook projections).
- ``adapters/<m>``: ``*.lora_a.<m>.*`` and ``*.lora_b.<m>.*``, one group per modality ``m``
  (or ``shared``). torchtune's single LoRA (``*.lora_a.weight``) and DoRA's ``*.magnitude``
  count as ``adapters``.
- ``norms/<m>``: per-modality RMSNorm scales ``*.scales.<m>``.
- ``base``: every other parameter, normally the frozen pretrained weights.

A parameter is trainable when its ``requires_grad`` is set. Buffers (codebooks, RoPE caches)
are not parameters and are not counted. Shared (tied) parameters count once.

The command builds the model on the meta device: every tensor has a shape and no storage, so a
3B model is counted without allocating its weights.
"""

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

BASE = "base"
EMBEDDINGS = "embeddings"
ADAPTERS = "adapters"
NORMS = "norms"

_EMBEDDING_PATTERN = re.compile(r"^tok_embeddings\.")
_MODALITY_ADAPTER_PATTERN = re.compile(r"(?:^|\.)lora_[ab]\.(?P<modality>[^.]+)\.")
_SINGLE_ADAPTER_PATTERN = re.compile(r"(?:^|\.)(?:lora_[ab]\.weight|magnitude)$")
_MODALITY_NORM_PATTERN = re.compile(r"(?:^|\.)scales\.(?P<modality>[^.]+)$")

# Table order of the group kinds.
_KIND_ORDER = {EMBEDDINGS: 0, ADAPTERS: 1, NORMS: 2, BASE: 3}


@dataclass
class ParameterGroup:
    """Parameter counts of one group.

    Args:
        name (str): group name, e.g. ``"adapters/image"``.
        trainable (int): number of elements in parameters with ``requires_grad`` set.
        total (int): number of elements in all the group's parameters.
    """

    name: str
    trainable: int = 0
    total: int = 0


def parameter_group(name: str) -> str:
    """Return the group of a parameter from its fully qualified name (see the module docstring)."""
    if _EMBEDDING_PATTERN.search(name):
        return EMBEDDINGS
    match = _MODALITY_ADAPTER_PATTERN.search(name)
    if match:
        return f"{ADAPTERS}/{match['modality']}"
    if _SINGLE_ADAPTER_PATTERN.search(name):
        return ADAPTERS
    match = _MODALITY_NORM_PATTERN.search(name)
    if match:
        return f"{NORMS}/{match['modality']}"
    return BASE


def count_parameters(model: nn.Module) -> List[ParameterGroup]:
    """Count trainable and total parameters of ``model`` per group.

    Works on any device, including meta, because it reads only shapes and ``requires_grad``.

    Args:
        model (nn.Module): the model to count.

    Returns:
        List[ParameterGroup]: embeddings, adapter groups, norm groups, then base, leaving out
        kinds the model does not have. The total is not included (see ``total_row``).
    """
    groups: Dict[str, ParameterGroup] = {}
    for name, parameter in model.named_parameters():
        group_name = parameter_group(name)
        group = groups.setdefault(group_name, ParameterGroup(group_name))
        group.total += parameter.numel()
        if parameter.requires_grad:
            group.trainable += parameter.numel()
    # Within a kind, text comes first and other modalities in the order they first appear.
    modality_order: Dict[str, int] = {"text": -1}
    for name in groups:
        modality_order.setdefault(name.partition("/")[2], len(modality_order))
    return sorted(
        groups.values(),
        key=lambda g: (_KIND_ORDER[g.name.partition("/")[0]], modality_order[g.name.partition("/")[2]]),
    )


def total_row(groups: Sequence[ParameterGroup]) -> ParameterGroup:
    """Return the sum of all groups as a group named ``total``."""
    return ParameterGroup("total", sum(g.trainable for g in groups), sum(g.total for g in groups))


def _format_count(count: int) -> str:
    return f"{count:,} ({count / 1e6:,.2f}M)"


def format_table(groups: Sequence[ParameterGroup]) -> str:
    """Format parameter groups as a text table with a total row.

    Counts are printed with thousands separators and in millions, e.g. ``1,179,648 (1.18M)``.

    Args:
        groups (Sequence[ParameterGroup]): groups as ``count_parameters`` returns them.

    Returns:
        str: the table, one line per group, with a header, the total and the trainable share.
    """
    total = total_row(groups)
    rows = [("group", "trainable", "total")]
    rows += [(g.name, _format_count(g.trainable), _format_count(g.total)) for g in groups]
    rows.append((total.name, _format_count(total.trainable), _format_count(total.total)))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]

    lines = []
    for index, (name, trainable, count) in enumerate(rows):
        lines.append(f"{name:<{widths[0]}}  {trainable:>{widths[1]}}  {count:>{widths[2]}}")
        if index == 0 or index == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    share = 100.0 * total.trainable / total.total if total.total else 0.0
    lines.append(f"trainable share: {share:.2f}% of all parameters")
    return "\n".join(lines)


def parse_modality(text: str) -> Dict[str, Any]:
    """Parse ``name:num_codes:codebook_dim`` (e.g. ``image:8192:256``) into a modality dict.

    Raises:
        argparse.ArgumentTypeError: if the text does not have three fields or a size is not an integer.
    """
    fields = text.split(":")
    if len(fields) != 3:
        raise argparse.ArgumentTypeError(
            f"Invalid modality {text!r}: expected name:num_codes:codebook_dim, e.g. image:8192:256."
        )
    name, num_codes, codebook_dim = fields
    try:
        return {"name": name, "num_codes": int(num_codes), "codebook_dim": int(codebook_dim)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"Invalid modality {text!r}: num_codes and codebook_dim must be integers, e.g. image:8192:256."
        ) from None


def _parse_overrides(overrides: Sequence[str], parser: argparse.ArgumentParser):
    """Turn ``key=value`` strings into an OmegaConf config, parsing each value as YAML."""
    from omegaconf import OmegaConf

    for override in overrides:
        if "=" not in override:
            parser.error(f"Invalid override {override!r}: expected key=value, e.g. model.lora_rank=16.")
    return OmegaConf.from_dotlist(list(overrides))


def _resolve_builder(name: str, parser: argparse.ArgumentParser):
    """Import a builder by dotted path. A bare name is looked up in ``mol_tune.models``."""
    from torchtune.config._errors import InstantiationError
    from torchtune.config._utils import _get_component_from_path

    import mol_tune.models

    try:
        return _get_component_from_path(name if "." in name else f"mol_tune.models.{name}")
    except (InstantiationError, ValueError) as error:
        reason = str(error).splitlines()[-1]
        parser.error(
            f"Builder not found: {name!r} ({reason}). mol_tune.models has: {', '.join(mol_tune.models.__all__)}. "
            "Any other builder needs a dotted path, e.g. torchtune.models.llama3_2.llama3_2_1b."
        )


def build_from_config(config_name_or_path: str, overrides: Sequence[str], parser: argparse.ArgumentParser) -> nn.Module:
    """Instantiate the ``model`` section of a config on the meta device.

    Args:
        config_name_or_path (str): a registered config name (``mol_finetune/<stem>`` or torchtune's)
            or a path to a YAML file.
        overrides (Sequence[str]): ``key=value`` overrides relative to the config root, as for
            ``mol-tune run`` (e.g. ``model.lora_rank=16``).
        parser (argparse.ArgumentParser): parser that reports invalid input.

    Returns:
        nn.Module: the model, with every parameter on the meta device.
    """
    from omegaconf import OmegaConf
    from torchtune import config

    from mol_tune import _registry

    path = _registry.find_config(config_name_or_path)
    if path is None:
        path = config_name_or_path
        if not config_name_or_path.endswith((".yaml", ".yml")) or not Path(path).is_file():
            known = ", ".join(_registry.config_files()) or "none installed"
            parser.error(
                f"Config not found: {config_name_or_path!r} is neither a registered config name nor a "
                f"YAML file. mol_tune's configs: {known}. Run `mol-tune ls` to list torchtune's as well."
            )
    cfg = OmegaConf.merge(OmegaConf.load(path), _parse_overrides(overrides, parser))
    if "model" not in cfg:
        parser.error(f"Invalid config {path}: it has no `model` section to instantiate.")
    with torch.device("meta"):
        return config.instantiate(cfg.model)


def build_from_builder(
    builder: str, modalities: Sequence[Dict[str, Any]], overrides: Sequence[str], parser: argparse.ArgumentParser
) -> nn.Module:
    """Call a model builder on the meta device.

    Args:
        builder (str): dotted path of the builder, or a name in ``mol_tune.models``.
        modalities (Sequence[Dict[str, Any]]): passed as ``modalities=`` when not empty.
        overrides (Sequence[str]): further keyword arguments as ``key=value``.
        parser (argparse.ArgumentParser): parser that reports invalid input.

    Returns:
        nn.Module: the model, with every parameter on the meta device.
    """
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(_parse_overrides(overrides, parser), resolve=True)
    if modalities:
        kwargs["modalities"] = list(modalities)
    build = _resolve_builder(builder, parser)
    with torch.device("meta"):
        return build(**kwargs)


def freeze_like_torchtune_lora(model: nn.Module) -> bool:
    """Leave only adapter parameters trainable when the builder froze nothing, as torchtune's LoRA recipes do.

    torchtune's LoRA builders return every parameter trainable, and its LoRA recipes then call
    ``set_trainable_params(model, get_adapter_params(model))``. MoL builders freeze the base
    weights themselves, so their models are left as they are.

    Args:
        model (nn.Module): the model; changed in place.

    Returns:
        bool: whether the model was changed.
    """
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    if not all(parameter.requires_grad for parameter in model.parameters()):
        return False
    adapter_params = get_adapter_params(model)
    if not adapter_params:
        return False
    set_trainable_params(model, adapter_params)
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``mol-tune params``: print the parameter table of a config's model or of a builder."""
    parser = argparse.ArgumentParser(
        prog="mol-tune params",
        description="Print trainable and total parameters per group (embeddings, adapters and norms per "
        "modality, base). The model is built on the meta device, so no weights are allocated or loaded.",
        epilog="examples:\n"
        "  mol-tune params --config mol_finetune/smollm2_135m_digits\n"
        "  mol-tune params --config my.yaml model.lora_rank=16\n"
        "  mol-tune params --builder mol_llama3_2_1b --modality image:8192:256 lora_rank=8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="registered config name (see `mol-tune ls`) or path to a YAML file")
    source.add_argument(
        "--builder",
        help="model builder: a name in mol_tune.models (e.g. mol_smollm2_135m) or a dotted path "
        "(e.g. torchtune.models.llama3_2.lora_llama3_2_1b, which also needs lora_attn_modules=[q_proj,v_proj])",
    )
    parser.add_argument(
        "--modality",
        action="append",
        type=parse_modality,
        default=[],
        metavar="NAME:NUM_CODES:CODEBOOK_DIM",
        help="a non-text modality for --builder, e.g. image:8192:256; repeat for several",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="with --config: config overrides (model.lora_rank=16); with --builder: builder arguments (lora_rank=16)",
    )
    args = parser.parse_args(argv)

    if args.config is not None:
        if args.modality:
            parser.error("--modality applies to --builder only; set modalities in the config or as model.modalities=...")
        model = build_from_config(args.config, args.overrides, parser)
        source_name = args.config
    else:
        model = build_from_builder(args.builder, args.modality, args.overrides, parser)
        source_name = args.builder
    print(f"{source_name}: {type(model).__name__}")
    if freeze_like_torchtune_lora(model):
        print("The builder froze nothing; counted as torchtune's LoRA recipes train it: adapter parameters only.")
    print(format_table(count_parameters(model)))


if __name__ == "__main__":
    main(sys.argv[1:])
