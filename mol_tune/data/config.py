"""The ``data:`` section of a recipe config, and the training and validation loaders it describes.

A section looks like this (paths may use ``~`` and ``$VARS``)::

    data:
      datasets:
        - {name: digits, train: [.../digits/train.parquet], validation: [.../digits/validation.parquet]}
        - {name: sklearn_text, train: [...], validation: [...]}
      token_shares: {image: 0.5, text: 0.5}   # or null: sample data sets by size
      on_unreachable_shares: raise             # or closest
      curriculum:                              # modality -> schedule of its longest admitted span
        speech: {schedule: linear, start: 100, end: 1500, num_steps: 1000}
      seq_len: 256
      batch_size: 4
      bos_id: null
      eos_id: 0
      pad_id: 2
      on_too_long: skip
      split_text_samples: false   # or true: cut text-only samples across sequences instead of skipping long ones
      on_error: raise     # or skip: leave out unreadable shards and invalid rows, counted in batch["skipped"]

A section with top-level ``train`` and ``validation`` lists instead of ``datasets`` is read as
one data set named ``default``.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from omegaconf import OmegaConf
from torchdata.nodes import Loader

from mol_tune.data.bad_input import ON_ERROR_POLICIES
from mol_tune.data.curriculum import LengthSchedule, build_schedule
from mol_tune.data.mixture import MixturePlan
from mol_tune.data.pipeline import build_dataloader, build_mixture_dataloader
from mol_tune.vocab import VocabularyLayout

LEGACY_DATASET_NAME = "default"

_SECTION_KEYS = {
    "datasets", "train", "validation", "token_shares", "on_unreachable_shares", "curriculum", "seq_len",
    "batch_size", "bos_id", "eos_id", "pad_id", "on_too_long", "split_text_samples", "on_error", "shuffle_segments",
    "num_workers", "prefetch_factor",
}  # fmt: skip
_DATASET_KEYS = {"name", "train", "validation"}


@dataclass(frozen=True)
class DatasetConfig:
    """One data set of the ``data.datasets`` list.

    Args:
        name (str): name used in logs and validation tags, e.g. ``loss/val/<name>/<modality>``.
        train (Tuple[str, ...]): training shard files or folders, with ``~`` and variables expanded.
        validation (Tuple[str, ...]): validation shard files or folders, possibly empty.
    """

    name: str
    train: Tuple[str, ...]
    validation: Tuple[str, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    """The parsed ``data:`` section. Fields and defaults match ``build_mixture_dataloader``'s arguments."""

    datasets: Tuple[DatasetConfig, ...]
    seq_len: int
    batch_size: int
    token_shares: Optional[Dict[str, float]] = None
    on_unreachable_shares: str = "raise"
    curriculum: Dict[str, LengthSchedule] = field(default_factory=dict)
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: int = 0
    on_too_long: str = "skip"
    split_text_samples: bool = False
    on_error: str = "raise"
    shuffle_segments: bool = True
    num_workers: int = 0
    prefetch_factor: int = 2


def _expand_paths(value: Any, where: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"Invalid {where}: {value!r}. Give a shard file or folder, or a list of them.")
    return tuple(os.path.expandvars(os.path.expanduser(str(path))) for path in value)


def _parse_dataset(entry: Any, index: int) -> DatasetConfig:
    where = f"data.datasets[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"Invalid {where}: {entry!r}. Each data set is a mapping with name, train and validation.")
    unknown = sorted(set(entry) - _DATASET_KEYS)
    if unknown:
        raise ValueError(f"Invalid {where}: unknown keys {unknown}. A data set has keys {sorted(_DATASET_KEYS)}.")
    name = entry.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Invalid {where}.name: {name!r}. Use an identifier such as 'digits'.")
    train = _expand_paths(entry.get("train"), f"{where}.train")
    if not train:
        raise ValueError(f"Missing {where}.train: data set {name!r} needs training shards.")
    return DatasetConfig(name, train, _expand_paths(entry.get("validation"), f"{where}.validation"))


def parse_data_config(section: Mapping[str, Any]) -> DataConfig:
    """Check a ``data:`` section and return it as a ``DataConfig``.

    Args:
        section (Mapping[str, Any]): the section, as a dict or an OmegaConf node.

    Returns:
        DataConfig: the parsed section, with paths expanded and schedules built.

    Raises:
        ValueError: if a key is unknown or missing, a data set name repeats, or a schedule is invalid.
    """
    if OmegaConf.is_config(section):
        section = OmegaConf.to_container(section, resolve=True)
    section = dict(section)
    unknown = sorted(set(section) - _SECTION_KEYS)
    if unknown:
        raise ValueError(f"Invalid data section: unknown keys {unknown}. Known keys: {sorted(_SECTION_KEYS)}.")
    for key in ("seq_len", "batch_size"):
        if key not in section:
            raise ValueError(f"Missing data.{key}: the data section must set it.")

    if "datasets" in section:
        if "train" in section or "validation" in section:
            raise ValueError("Invalid data section: give either data.datasets or data.train/validation, not both.")
        entries = section.pop("datasets") or []
        datasets = tuple(_parse_dataset(entry, index) for index, entry in enumerate(entries))
    else:
        entry = {"name": LEGACY_DATASET_NAME, "train": section.pop("train", None)}
        entry["validation"] = section.pop("validation", None)
        datasets = (_parse_dataset(entry, 0),)
    if not datasets:
        raise ValueError("Invalid data.datasets: the list is empty. Add at least one data set.")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"Invalid data.datasets: names repeat in {names}.")

    curriculum = {
        str(modality): build_schedule(spec) for modality, spec in (section.pop("curriculum", None) or {}).items()
    }
    if not isinstance(section.get("split_text_samples", False), bool):
        raise ValueError(f"Invalid data.split_text_samples: {section['split_text_samples']!r}. Use true or false.")
    if "on_error" in section and section["on_error"] not in ON_ERROR_POLICIES:
        raise ValueError(f"Invalid data.on_error: {section['on_error']!r}. Use one of {ON_ERROR_POLICIES}.")
    token_shares = section.pop("token_shares", None)
    if token_shares is not None:
        token_shares = {str(name): float(share) for name, share in dict(token_shares).items()}
    return DataConfig(datasets=datasets, curriculum=curriculum, token_shares=token_shares, **section)


def _loader_settings(data: DataConfig) -> Dict[str, Any]:
    """Return the ``data:`` settings that the training and validation loaders share, as keyword arguments."""
    names = (
        "seq_len", "batch_size", "bos_id", "eos_id", "pad_id", "shuffle_segments", "on_too_long",
        "split_text_samples", "on_error", "num_workers", "prefetch_factor",
    )
    return {name: getattr(data, name) for name in names}


def build_training_loader(
    section: Mapping[str, Any],
    layout: VocabularyLayout,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batches_per_step: int = 1,
    codebook_fingerprints: Optional[Mapping[str, str]] = None,
) -> Tuple[Loader, MixturePlan]:
    """Build the endless, shuffled training loader that a ``data:`` section describes.

    Args:
        section (Mapping[str, Any]): the ``data:`` section.
        layout (VocabularyLayout): the model's vocabulary layout.
        seed (int): seed of the mixture, the shuffles and the segment order. Default: 0.
        rank (int): data-parallel rank. Default: 0.
        world_size (int): number of data-parallel ranks. Default: 1.
        batches_per_step (int): batches per optimizer step, for the curriculum's step. Default: 1.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality -> fingerprint of the model's
            codebook. None skips the check. Default: None.

    Returns:
        Tuple[Loader, MixturePlan]: the loader and the mixture's weights and expected token shares.

    Raises:
        ValueError: if the section is invalid or its token shares are unreachable (see ``solve_mixture``).
        ShardError: if a shard is unreadable or does not fit the layout or codebooks, and
            ``data.on_error`` is ``"raise"``.
    """
    data = parse_data_config(section)
    return build_mixture_dataloader(
        {d.name: list(d.train) for d in data.datasets},
        layout,
        token_shares=data.token_shares,
        on_unreachable_shares=data.on_unreachable_shares,
        max_span_schedules=data.curriculum,
        batches_per_step=batches_per_step,
        seed=seed,
        rank=rank,
        world_size=world_size,
        codebook_fingerprints=codebook_fingerprints,
        **_loader_settings(data),
    )


def build_validation_loaders(
    section: Mapping[str, Any],
    layout: VocabularyLayout,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    codebook_fingerprints: Optional[Mapping[str, str]] = None,
) -> Dict[str, Loader]:
    """Build one single-pass, unshuffled loader per data set that has validation shards.

    Every pass yields the same batches. No mixture and no curriculum apply: each split is read whole.

    Args:
        section (Mapping[str, Any]): the ``data:`` section.
        layout (VocabularyLayout): the model's vocabulary layout.
        seed (int): seed of the segment order. Default: 0.
        rank (int): data-parallel rank. Default: 0.
        world_size (int): number of data-parallel ranks. Default: 1.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality -> fingerprint of the model's
            codebook. None skips the check. Default: None.

    Returns:
        Dict[str, Loader]: data set name -> loader, in config order.

    Raises:
        ValueError: if the section is invalid. While iterating: if every sample of a split is skipped,
            with a message that names the data set.
        ShardError: if a shard is unreadable or does not fit the layout or codebooks, and
            ``data.on_error`` is ``"raise"``.
    """
    data = parse_data_config(section)
    loaders: Dict[str, Loader] = {}
    for dataset in data.datasets:
        if not dataset.validation:
            continue
        loaders[dataset.name] = build_dataloader(
            list(dataset.validation),
            layout,
            seed=seed,
            rank=rank,
            world_size=world_size,
            infinite=False,
            shuffle=False,
            codebook_fingerprints=codebook_fingerprints,
            name=f"the validation split of data set {dataset.name!r}",
            **_loader_settings(data),
        )
    return loaders

