"""Mixing data sets by token share: sampling weights that give each modality its share of training tokens.

A sample contains tokens of several modalities (a caption and an image, say), and the delimiters
around a code span count as text. So each data set has a composition: the fraction of its tokens
that belong to each modality. If data set ``d`` contributes a fraction ``x_d`` of the training
tokens, modality ``m`` gets the share ``sum_d x_d f_dm``, where ``f_dm`` is the fraction of ``d``'s
tokens that are of modality ``m``. ``solve_mixture`` finds ``x`` on the simplex whose shares match
the config, and turns it into per-sample sampling weights ``p_d ~ x_d / T_d``, where ``T_d`` is
the mean number of tokens of one sample of ``d``.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from scipy.optimize import nnls

from mol_tune.data import bad_input
from mol_tune.data.bad_input import SkipCounter, check_on_error
from mol_tune.data.shards import ShardError, ShardReader, read_row_group
from mol_tune.data.source import expand_shard_paths
from mol_tune.vocab import TEXT, VocabularyLayout

log = logging.getLogger(__name__)

ON_UNREACHABLE_POLICIES = ("raise", "closest")

# A share within this distance of the target counts as reached.
SHARE_TOLERANCE = 1e-3
# Weight of the tie-break towards equal token fractions per data set. It is small enough to leave
# the reached shares unchanged to about 1e-6, and only picks one of several exact solutions.
_TIE_BREAK_WEIGHT = 1e-3
# Weight of the row that keeps the token fractions summing to 1 when the target is unreachable.
_SUM_ROW_WEIGHT = 100.0
# A data set whose token fraction is below this gets no samples. The tie-break alone leaves
# fractions of about 1e-6 on data sets that an exact solution does not need.
_MIN_TOKEN_FRACTION = 1e-4


@dataclass(frozen=True)
class DatasetProfile:
    """Token counts of one data set's samples after sample construction, measured on its shards.

    Args:
        name (str): data set name from the config.
        modality_names (Tuple[str, ...]): the layout's modality names, ``"text"`` first.
        mean_tokens (Tuple[float, ...]): mean tokens of one admitted sample per modality, in
            ``modality_names`` order. Text includes delimiters, BOS and EOS.
        num_samples (int): samples admitted to the measurement.
        num_excluded (int): samples left out because the pipeline never trains on them (longer
            than ``seq_len`` or with a span above the curriculum's final maximum).
        skipped (Dict[str, int]): shards and rows left out as unreadable or invalid with
            ``on_error="skip"``, as ``{"shards/<reason>": n, "rows/<reason>": n}``. Default: {}.
    """

    name: str
    modality_names: Tuple[str, ...]
    mean_tokens: Tuple[float, ...]
    num_samples: int
    num_excluded: int
    skipped: Dict[str, int] = field(default_factory=dict)

    @property
    def mean_sample_tokens(self) -> float:
        """Mean tokens of one admitted sample, all modalities together."""
        return float(sum(self.mean_tokens))

    @property
    def composition(self) -> np.ndarray:
        """Fraction of this data set's tokens per modality, in ``modality_names`` order."""
        return np.asarray(self.mean_tokens, dtype=np.float64) / self.mean_sample_tokens


def _segment_token_counts(
    segments: pa.ListArray, layout: VocabularyLayout, known: Sequence[str]
) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """Count tokens per row and modality in a ``segments`` column as ``SampleBuilder`` emits them, without BOS and EOS.

    Args:
        segments (pa.ListArray): the column, one list of segments per row.
        layout (VocabularyLayout): the model's vocabulary layout.
        known (Sequence[str]): modalities a row may contain. A row with another one is invalid.

    Returns:
        Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]: int64 arrays [rows, modalities] of the
        tokens (two text delimiters per non-text segment) and of the longest segment of each
        modality, and for each unknown modality the rows that contain it.
    """
    names = layout.modality_names
    # Counted with Arrow kernels and NumPy, not row by row.
    rows = pc.list_parent_indices(segments).to_numpy()
    modality_column, token_column = segments.flatten().flatten()
    lengths = pc.list_value_length(token_column).fill_null(0).to_numpy().astype(np.int64)
    modality_of_segment = modality_column.to_numpy(zero_copy_only=False)

    counts = np.zeros((len(segments), len(names)), dtype=np.int64)
    longest = np.zeros((len(segments), len(names)), dtype=np.int64)
    unknown = {}
    for name in np.unique(modality_of_segment):
        selected = modality_of_segment == name
        if name not in known:
            unknown[str(name)] = np.unique(rows[selected])
            continue
        index = names.index(name)
        np.add.at(counts[:, index], rows[selected], lengths[selected])
        np.maximum.at(longest[:, index], rows[selected], lengths[selected])
        if name != TEXT:
            np.add.at(counts[:, 0], rows[selected], 2)
    return counts, longest, unknown


class _ShardCounter:
    """Count the tokens of shards, raising or skipping where ``ShardSource`` raises or skips."""

    def __init__(self, layout: VocabularyLayout, codebook_fingerprints: Optional[Mapping[str, str]], on_error: str):
        self.layout = layout
        self.codebook_fingerprints = codebook_fingerprints
        self.on_error = check_on_error(on_error)
        self.skipped_shards = SkipCounter("shard", log)
        self.skipped_rows = SkipCounter("row", log)

    def _skip(self, error: ShardError, counter: SkipCounter, count: int = 1) -> None:
        if self.on_error == "raise":
            raise error
        counter.record(error, count)

    def count(self, path: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Count the tokens and longest segments [rows, modalities] of a shard's valid rows.

        Returns None if the shard is skipped or every row group is damaged.
        """
        try:
            # The file checks of ShardSource, with its messages. No row is read here.
            info = ShardReader(path, self.layout, self.codebook_fingerprints).info
        except ShardError as error:
            self._skip(error, self.skipped_shards)
            return None
        known = [TEXT] + sorted(info.modalities)
        parquet_file = pq.ParquetFile(path)
        counts, longest, first_row = [], [], 0
        for group in range(parquet_file.num_row_groups):
            num_rows = parquet_file.metadata.row_group(group).num_rows
            try:
                # sample_id is read as well, so damage in either column is found, as the reader finds it.
                table = read_row_group(parquet_file, path, group, first_row, columns=["sample_id", "segments"])
            except ShardError as error:
                self._skip(error, self.skipped_rows, num_rows)
                first_row += num_rows
                continue
            group_counts, group_longest, unknown = _segment_token_counts(
                table.column("segments").combine_chunks(), self.layout, known
            )
            valid = np.ones(num_rows, dtype=bool)
            for name, bad_rows in unknown.items():
                error = ShardError(
                    f"Invalid sample in shard {path}, row {first_row + int(bad_rows[0])}: it has modality {name!r}, "
                    f"but the shard's metadata lists {known}. Remove the row from the input data, or skip bad "
                    "rows with on_error: skip.",
                    reason=bad_input.UNKNOWN_MODALITY,
                )
                self._skip(error, self.skipped_rows, int(valid[bad_rows].sum()))
                valid[bad_rows] = False
            counts.append(group_counts[valid])
            longest.append(group_longest[valid])
            first_row += num_rows
        if not counts:
            return None
        return np.concatenate(counts), np.concatenate(longest)

    def skipped(self) -> Dict[str, int]:
        """Return the skips so far as ``{"shards/<reason>": n, "rows/<reason>": n}``."""
        result = {f"shards/{reason}": n for reason, n in self.skipped_shards.counts.items()}
        result.update({f"rows/{reason}": n for reason, n in self.skipped_rows.counts.items()})
        return result


def measure_dataset_profile(
    name: str,
    paths: Union[str, Sequence[str]],
    layout: VocabularyLayout,
    *,
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    max_sample_tokens: Optional[int] = None,
    keep_long_text_samples: bool = False,
    max_span_tokens: Optional[Mapping[str, int]] = None,
    codebook_fingerprints: Optional[Mapping[str, str]] = None,
    on_error: str = "raise",
) -> DatasetProfile:
    """Measure the mean tokens per modality of a data set's samples, reading only the shards' segment lengths.

    Counts follow ``SampleBuilder``: a non-text segment adds its codes plus two text delimiters,
    and BOS and EOS count as text. Samples that the pipeline drops (longer than
    ``max_sample_tokens``, or with a span longer than ``max_span_tokens``) are left out, so the
    profile describes the tokens that reach training.

    Bad input follows ``on_error`` as in ``ShardSource``. Bad input here is a shard that is
    unreadable or does not fit the layout or codebooks, a damaged row group, or a row with a
    modality that its shard's metadata lacks. With ``"raise"`` it raises a ``ShardError`` naming
    the file. With ``"skip"`` it is left out, counted in the profile's ``skipped`` and logged.

    NOTE: every row of every shard is counted. Reading one column takes seconds per million rows,
    but a data set of billions of rows would need a sample of rows here instead.

    NOTE: rows that the reader rejects for their values (an empty segment, a code outside the
    codebook, a text id outside the vocabulary) are still counted here, so with ``on_error="skip"``
    they shift the means slightly.

    Args:
        name (str): data set name, for the profile and the messages.
        paths (Union[str, Sequence[str]]): shard files or folders of ``*.parquet`` files.
        layout (VocabularyLayout): the model's vocabulary layout.
        bos_id (Optional[int]): BOS id put before each sample, or None. Default: None.
        eos_id (Optional[int]): EOS id put after each sample, or None. Default: None.
        max_sample_tokens (Optional[int]): leave out samples longer than this (``seq_len``). Default: None.
        keep_long_text_samples (bool): keep text-only samples longer than ``max_sample_tokens``,
            because ``split_text_samples`` packs them in pieces. Default: False.
        max_span_tokens (Optional[Mapping[str, int]]): modality -> longest admitted span in codes
            (the curriculum's final maximum). Default: None.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality -> fingerprint of the model's
            codebook, which every shard must match. None skips the check. Default: None.
        on_error (str): ``"raise"`` or ``"skip"`` for bad input, as described above. Default: "raise".

    Returns:
        DatasetProfile: the profile.

    Raises:
        ValueError: if ``on_error`` is unknown, no row can be read, or no sample is admitted.
        ShardError: if a shard, row group or row is bad and ``on_error`` is ``"raise"``.
        FileNotFoundError: if a path does not exist.
    """
    names = layout.modality_names
    counter = _ShardCounter(layout, codebook_fingerprints, on_error)
    per_file = [counter.count(path) for path in expand_shard_paths(paths)]
    per_file = [result for result in per_file if result is not None]
    if not per_file:
        raise ValueError(
            f"Invalid data set {name!r}: no row of its shards could be read ({counter.skipped_shards.summary()}, "
            f"{counter.skipped_rows.summary()}). Fix the files that the warnings above name, or drop the data set."
        )
    counts = np.concatenate([c for c, _ in per_file])
    longest = np.concatenate([s for _, s in per_file])

    admitted = counts.sum(axis=1) > 0
    counts[:, 0] += (bos_id is not None) + (eos_id is not None)
    if max_sample_tokens is not None:
        fits = counts.sum(axis=1) <= max_sample_tokens
        if keep_long_text_samples:
            # The packer cuts text-only samples across sequences instead of dropping them.
            fits |= counts[:, 1:].sum(axis=1) == 0
        admitted &= fits
    for modality, limit in (max_span_tokens or {}).items():
        admitted &= longest[:, names.index(modality)] <= limit

    if not admitted.any():
        raise ValueError(
            f"Invalid data set {name!r}: none of its {len(counts)} samples fits seq_len={max_sample_tokens} "
            f"and the span limits {dict(max_span_tokens or {})}. Raise seq_len or the limits, or drop the data set."
        )
    mean_tokens = counts[admitted].mean(axis=0)
    return DatasetProfile(
        name=name,
        modality_names=tuple(names),
        mean_tokens=tuple(float(v) for v in mean_tokens),
        num_samples=int(admitted.sum()),
        num_excluded=int((~admitted).sum()),
        skipped=counter.skipped(),
    )


@dataclass(frozen=True)
class MixturePlan:
    """Sampling weights of the data sets and the token shares they give.

    Args:
        profiles (Tuple[DatasetProfile, ...]): one profile per data set, in config order.
        token_fractions (Dict[str, float]): data set -> fraction of training tokens it contributes.
        sampling_weights (Dict[str, float]): data set -> probability that the next sample comes
            from it, summing to 1. Data sets with a zero token fraction are left out.
        expected_shares (Dict[str, float]): modality -> share of training tokens these weights give.
        target_shares (Optional[Dict[str, float]]): modality -> share from the config, or None when
            the data sets are mixed in proportion to their sizes.
    """

    profiles: Tuple[DatasetProfile, ...]
    token_fractions: Dict[str, float]
    sampling_weights: Dict[str, float]
    expected_shares: Dict[str, float]
    target_shares: Optional[Dict[str, float]]

    def describe(self) -> List[str]:
        """Return log lines: each data set's composition and weight, then the expected token shares."""
        lines = []
        for profile in self.profiles:
            composition = ", ".join(
                f"{name} {share:.3f}" for name, share in zip(profile.modality_names, profile.composition) if share > 0
            )
            skipped = f", skipped as invalid: {profile.skipped}" if profile.skipped else ""
            lines.append(
                f"Data set {profile.name}: {profile.mean_sample_tokens:.1f} tokens a sample ({composition}), "
                f"{profile.num_samples} samples ({profile.num_excluded} left out as too long{skipped}), sampling "
                f"weight {self.sampling_weights.get(profile.name, 0.0):.4f}, token fraction "
                f"{self.token_fractions[profile.name]:.3f}"
            )
        expected = ", ".join(f"{name} {share:.3f}" for name, share in self.expected_shares.items())
        target = "sizes of the data sets" if self.target_shares is None else ", ".join(
            f"{name} {share:.3f}" for name, share in self.target_shares.items()
        )
        lines.append(f"Expected token shares: {expected} (target: {target})")
        return lines


def _check_shares(token_shares: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    unknown = sorted(set(token_shares) - set(names))
    if unknown:
        raise ValueError(f"Invalid token_shares: modalities {unknown} are not in the model, which has {list(names)}.")
    target = np.array([float(token_shares.get(name, 0.0)) for name in names])
    if not np.all(np.isfinite(target)) or np.any(target < 0):
        raise ValueError(f"Invalid token_shares {dict(token_shares)}: every share must be a number >= 0.")
    if abs(target.sum() - 1.0) > 1e-6:
        raise ValueError(f"Invalid token_shares {dict(token_shares)}: the shares sum to {target.sum():g}, not 1.")
    return target


def _closest_token_fractions(compositions: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Return token fractions ``x`` (x >= 0, sum 1) that minimise ``|compositions.T @ x - target|``.

    When several ``x`` reach the target, as with more data sets than modalities, a small pull
    towards equal fractions picks the one that uses every data set as evenly as it can.
    """
    num_datasets = len(compositions)
    matrix = np.vstack(
        [
            compositions.T,
            _TIE_BREAK_WEIGHT * np.eye(num_datasets),
            _SUM_ROW_WEIGHT * np.ones((1, num_datasets)),
        ]
    )
    rhs = np.concatenate([target, np.full(num_datasets, _TIE_BREAK_WEIGHT / num_datasets), [_SUM_ROW_WEIGHT]])
    fractions, _ = nnls(matrix, rhs)
    return fractions / fractions.sum()


def solve_mixture(
    profiles: Sequence[DatasetProfile],
    token_shares: Optional[Mapping[str, float]] = None,
    on_unreachable: str = "raise",
) -> MixturePlan:
    """Derive per-data-set sampling weights from the target token share of each modality.

    Without ``token_shares``, the data sets are sampled in proportion to their sample counts, as if
    they were concatenated. With them, the token fractions ``x`` solve ``sum_d x_d f_dm = s_m`` by
    non-negative least squares on the simplex, and the sampling weights are ``x_d / T_d``.

    Args:
        profiles (Sequence[DatasetProfile]): one profile per data set, with distinct names.
        token_shares (Optional[Mapping[str, float]]): modality -> share of training tokens, summing
            to 1. A modality left out gets 0. Default: None.
        on_unreachable (str): ``"raise"`` when no mix of the data sets reaches the shares, or
            ``"closest"`` to log a warning and use the closest reachable shares. Default: "raise".

    Returns:
        MixturePlan: the weights and the shares they give.

    Raises:
        ValueError: if the shares are invalid, or unreachable with ``on_unreachable="raise"``; the
            message gives each data set's composition and the reachable range of each modality.
    """
    if on_unreachable not in ON_UNREACHABLE_POLICIES:
        raise ValueError(f"Invalid on_unreachable_shares: {on_unreachable!r}. Use one of {ON_UNREACHABLE_POLICIES}.")
    if not profiles:
        raise ValueError("Invalid data config: no data set given. Add at least one to data.datasets.")
    dataset_names = [p.name for p in profiles]
    if len(set(dataset_names)) != len(dataset_names):
        raise ValueError(f"Invalid data sets: names repeat in {dataset_names}.")
    names = list(profiles[0].modality_names)
    compositions = np.stack([p.composition for p in profiles])
    sample_tokens = np.array([p.mean_sample_tokens for p in profiles])

    if token_shares is None:
        fractions = sample_tokens * np.array([p.num_samples for p in profiles])
        fractions = fractions / fractions.sum()
        target_shares = None
    else:
        target = _check_shares(token_shares, names)
        fractions = _closest_token_fractions(compositions, target)
        reached = compositions.T @ fractions
        target_shares = {name: float(v) for name, v in zip(names, target)}
        if np.max(np.abs(reached - target)) > SHARE_TOLERANCE:
            message = _unreachable_message(profiles, names, target_shares, reached)
            if on_unreachable == "raise":
                raise ValueError(message + " Change data.token_shares, or set data.on_unreachable_shares: closest.")
            log.warning(message + " Using the closest shares, as data.on_unreachable_shares is 'closest'.")

    fractions[fractions < _MIN_TOKEN_FRACTION] = 0.0
    fractions = fractions / fractions.sum()
    weights = fractions / sample_tokens
    weights = weights / weights.sum()
    for name, fraction in zip(dataset_names, fractions):
        if fraction == 0.0:
            log.warning(f"Data set {name!r} gets no training tokens at these token shares, so it is not sampled.")
    expected = compositions.T @ fractions
    return MixturePlan(
        profiles=tuple(profiles),
        token_fractions={name: float(v) for name, v in zip(dataset_names, fractions)},
        sampling_weights={name: float(w) for name, w in zip(dataset_names, weights) if w > 0},
        expected_shares={name: float(v) for name, v in zip(names, expected)},
        target_shares=target_shares,
    )


def _unreachable_message(
    profiles: Sequence[DatasetProfile], names: Sequence[str], target: Dict[str, float], closest: np.ndarray
) -> str:
    compositions = "; ".join(
        f"{p.name}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, p.composition)) for p in profiles
    )
    ranges = ", ".join(
        f"{name} {min(p.composition[i] for p in profiles):.3f} to {max(p.composition[i] for p in profiles):.3f}"
        for i, name in enumerate(names)
    )
    closest_text = ", ".join(f"{name} {v:.3f}" for name, v in zip(names, closest))
    return (
        f"Unreachable token_shares {target}: a mix of these data sets cannot give them. Token shares per data "
        f"set: {compositions}. A mix can give each modality a share in the range {ranges} (the shares together "
        f"must be a weighted mean of the data sets' shares). Closest reachable: {closest_text}."
    )


def count_modality_tokens(batch: Mapping[str, Any], layout: VocabularyLayout) -> torch.Tensor:
    """Count the tokens of each modality in a packed batch, leaving out padding.

    Args:
        batch (Mapping[str, Any]): a batch from ``collate_packed``.
        layout (VocabularyLayout): the model's vocabulary layout.

    Returns:
        torch.Tensor: long [num_modalities], in ``layout.modality_names`` order; delimiters count as text.
    """
    tokens = batch["tokens"]
    num_samples = torch.tensor([len(ids) for ids in batch["sample_ids"]], device=tokens.device)
    is_sample = batch["document_ids"] < num_samples.unsqueeze(-1)
    modality_ids = torch.zeros_like(tokens)
    for modality_id, (start, end) in enumerate(layout.code_ranges(), start=1):
        modality_ids[(tokens >= start) & (tokens < end)] = modality_id
    return torch.bincount(modality_ids[is_sample], minlength=len(layout.modality_names))

