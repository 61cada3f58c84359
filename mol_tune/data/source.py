"""The source node of the data pipeline: validated samples from the Parquet shards of one data set."""

import glob
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from torchdata.nodes import BaseNode

from mol_tune.data.bad_input import SkipCounter, check_on_error
from mol_tune.data.shards import (
    WRITE_SHARDS_COMMANDS,
    ShardError,
    ShardReader,
    check_shard_compatible,
    read_shard_info,
)
from mol_tune.vocab import VocabularyLayout

log = logging.getLogger(__name__)


def expand_shard_paths(paths: Union[str, Sequence[str]]) -> List[str]:
    """Turn a file, a folder of ``*.parquet`` files or a list of both into a list of shard files.

    Raises:
        FileNotFoundError: if a path does not exist or a folder contains no ``.parquet`` file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(str, paths):
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*.parquet")))
            if not found:
                raise FileNotFoundError(
                    f"No .parquet shard found in folder {path}. Fix the path, or write the shards first: "
                    f"{WRITE_SHARDS_COMMANDS}."
                )
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(
                f"Shard not found: {path}. Fix the path, or write the shards first: {WRITE_SHARDS_COMMANDS}."
            )
    if not files:
        raise FileNotFoundError("No shard paths given. Pass at least one Parquet file or folder.")
    return files


class ShardSource(BaseNode[Dict[str, Any]]):
    """Yield the samples of a data set's shards, shuffled per epoch, for one data-parallel rank.

    In each epoch, the file order and the row order inside each file are permutations drawn from
    ``(seed, epoch)``. Every rank draws the same permutations and takes every ``world_size``-th row
    of each file starting at ``rank``, so the ranks read disjoint rows that together cover the
    data set. A sample comes out as a dict with ``sample_id``, ``segments``, ``shard`` (the file),
    ``row`` (its 0-based row), ``epoch`` and ``skipped`` (see below).

    The state is the epoch, the position in that epoch's file order and the number of rows of the
    current file already yielded. Permutations are recomputed from the seed on resume.

    A one-pass source stops after one epoch. With ``shuffle``, each new pass after ``reset(None)``
    (a new ``iter`` of the ``Loader``) uses the next epoch's order, so an epoch loop gets a fresh
    shuffle per epoch. Without ``shuffle``, every pass is epoch 0, so repeated evaluation passes
    see the same samples with the same segment order.

    Bad input follows ``on_error``. With ``"raise"``, a shard that is unreadable or does not fit
    the layout or codebooks raises when the source is built. An invalid row (empty sample, code
    outside the codebook, unknown modality, text id outside the vocabulary, damaged row group)
    raises when it is read. With ``"skip"``, such a shard is left out and such a row is passed
    over. Each is counted per reason in ``skipped_shards`` and ``skipped_rows`` and logged, the
    first few in full (see ``mol_tune.data.bad_input.SkipCounter``). A bad row is counted each time
    a pass reads it, and the counts add up over passes. Row counts are part of the state, so they
    survive a resume.

    Each sample also carries the skips since the previous sample in ``skipped``, a dict
    ``{"shards/<reason>": count, "rows/<reason>": count}`` that is usually empty. The first sample
    of a pass carries the skipped shards. The counts travel with the samples, so a node that adds
    them up (``Packer``) gets the same totals in every thread and after a resume.

    NOTE: rows skipped after the last sample of a one-pass source reach no sample, so they are
    missing from those totals. ``skipped_rows`` and the log contain them.

    Args:
        paths (Union[str, Sequence[str]]): shard files or folders of ``*.parquet`` files.
        layout (Optional[VocabularyLayout]): the model's layout, which every shard must fit. Default: None.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality name -> fingerprint of the
            codebook the model was set up with. None skips the check. Default: None.
        seed (int): seed of the shuffles, the same on every rank. Default: 0.
        shuffle (bool): shuffle files and rows per epoch. Default: True.
        infinite (bool): start the next epoch at the end instead of stopping. Default: True.
        rank (int): this process's data-parallel rank. Default: 0.
        world_size (int): number of data-parallel ranks. Default: 1.
        on_error (str): ``"raise"`` or ``"skip"`` for a bad shard or row, as described above. Default: "raise".

    Raises:
        ValueError: if ``rank``, ``world_size`` or ``on_error`` is invalid, or this rank gets no rows.
            From ``next``: if every row of an epoch was skipped.
        ShardError: if a shard is unreadable or does not fit the layout or codebooks, and ``on_error``
            is ``"raise"``.
    """

    EPOCH_KEY = "epoch"
    FILE_POSITION_KEY = "file_position"
    ROW_POSITION_KEY = "row_position"
    SKIPPED_ROWS_KEY = "skipped_rows"
    UNREPORTED_SKIPS_KEY = "unreported_skips"
    YIELDED_KEY = "yielded_in_epoch"

    def __init__(
        self,
        paths: Union[str, Sequence[str]],
        layout: Optional[VocabularyLayout] = None,
        codebook_fingerprints: Optional[Mapping[str, str]] = None,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        rank: int = 0,
        world_size: int = 1,
        on_error: str = "raise",
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank {rank} for world_size {world_size}: need 0 <= rank < world_size.")
        self.paths = expand_shard_paths(paths)
        self.layout = layout
        self.codebook_fingerprints = codebook_fingerprints
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.rank = rank
        self.world_size = world_size
        self.on_error = check_on_error(on_error)
        self.skipped_shards = SkipCounter("shard", log)
        self.skipped_rows = SkipCounter("row", log)

        # Check every shard's metadata now, so a bad file fails at setup and not hours into training.
        # A skipped shard keeps its place in ``paths`` with 0 rows, so states stay comparable.
        self._num_rows = []
        for path in self.paths:
            try:
                info = read_shard_info(path)
                if layout is not None:
                    check_shard_compatible(info, path, layout, codebook_fingerprints)
                self._num_rows.append(ShardReader(path).num_rows)
            except ShardError as error:
                if self.on_error == "raise":
                    raise
                self.skipped_shards.record(error)
                self._num_rows.append(0)
        if sum(len(range(rank, n, world_size)) for n in self._num_rows) == 0:
            skipped = f", {self.skipped_shards.summary()}" if self.skipped_shards.total else ""
            raise ValueError(
                f"Invalid data split: rank {rank} of {world_size} gets no rows from {self.paths} "
                f"({sum(self._num_rows)} rows in all{skipped}). Use fewer ranks or more data."
            )

        self._next_pass_epoch = 0
        self._epoch = 0
        self._file_position = 0
        self._row_position = 0
        self._reader: Optional[ShardReader] = None
        self._reader_key: Optional[tuple] = None
        self._rows: Optional[np.ndarray] = None
        # Skips not yet passed on in a sample's ``skipped`` dict.
        self._unreported_skips: Dict[str, int] = {}
        self._yielded_in_epoch = 0

    @property
    def num_rows(self) -> int:
        """Rows in all shards, over all ranks."""
        return sum(self._num_rows)

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        if initial_state is not None:
            self._check_state(initial_state)
            self._epoch = initial_state[self.EPOCH_KEY]
            self._file_position = initial_state[self.FILE_POSITION_KEY]
            self._row_position = initial_state[self.ROW_POSITION_KEY]
            # States saved before skip counting existed have no counts.
            self.skipped_rows.counts = dict(initial_state.get(self.SKIPPED_ROWS_KEY, {}))
            self._unreported_skips = dict(initial_state.get(self.UNREPORTED_SKIPS_KEY, self._shard_skips()))
            # States saved before this count existed are taken to be past a yielded sample.
            self._yielded_in_epoch = initial_state.get(self.YIELDED_KEY, 1)
        else:
            self._epoch = self._next_pass_epoch if self.shuffle and not self.infinite else 0
            self._file_position = 0
            self._row_position = 0
            self._unreported_skips = self._shard_skips()
            self._yielded_in_epoch = 0
        self._next_pass_epoch = self._epoch + 1

    def _shard_skips(self) -> Dict[str, int]:
        return {f"shards/{reason}": count for reason, count in self.skipped_shards.counts.items()}

    def _check_state(self, state: Dict[str, Any]) -> None:
        saved = {key: state.get(key) for key in ("seed", "world_size", "rank", "paths")}
        current = {"seed": self.seed, "world_size": self.world_size, "rank": self.rank, "paths": self.paths}
        if saved != current:
            raise ValueError(
                f"Invalid data loader state: it was saved with {saved}, but this loader has {current}. "
                "Resume with the same data files, seed and data-parallel layout."
            )

    def _file_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.paths))
        return np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.paths))

    def _rank_rows(self, epoch: int, file_index: int) -> np.ndarray:
        num_rows = self._num_rows[file_index]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 1, file_index]).permutation(num_rows)
        else:
            order = np.arange(num_rows)
        return order[self.rank :: self.world_size]

    def next(self) -> Dict[str, Any]:
        while True:
            if self._file_position >= len(self.paths):
                if self._yielded_in_epoch == 0:
                    # Every row was skipped. An endless source would loop over the epochs forever.
                    raise ValueError(
                        f"Every row that rank {self.rank} of {self.world_size} read from {self.paths} in epoch "
                        f"{self._epoch} was skipped as invalid, so there is no sample. Skips so far: "
                        f"{self.skipped_rows.summary()}. Fix or drop the shards that the warnings above name."
                    )
                if not self.infinite:
                    raise StopIteration()
                self._epoch += 1
                self._yielded_in_epoch = 0
                self._next_pass_epoch = self._epoch + 1
                self._file_position = 0
                self._row_position = 0
                continue

            file_index = int(self._file_order(self._epoch)[self._file_position])
            if self._num_rows[file_index] == 0:
                # An empty or skipped shard: never open it.
                self._file_position += 1
                self._row_position = 0
                continue
            if self._reader_key != (self._epoch, file_index):
                # Only the current file's rows stay in memory.
                if self._reader is None or self._reader.path != self.paths[file_index]:
                    self._reader = ShardReader(
                        self.paths[file_index], self.layout, self.codebook_fingerprints, on_error=self.on_error
                    )
                self._rows = self._rank_rows(self._epoch, file_index)
                self._reader_key = (self._epoch, file_index)

            if self._row_position >= len(self._rows):
                self._file_position += 1
                self._row_position = 0
                continue

            row = int(self._rows[self._row_position])
            self._row_position += 1
            try:
                sample = self._reader[row]
            except ShardError as error:
                if self.on_error == "raise":
                    raise
                self.skipped_rows.record(error)
                key = f"rows/{error.reason}"
                self._unreported_skips[key] = self._unreported_skips.get(key, 0) + 1
                continue
            sample.update(shard=self._reader.path, row=row, epoch=self._epoch, skipped=self._unreported_skips)
            self._unreported_skips = {}
            self._yielded_in_epoch += 1
            return sample

    def get_state(self) -> Dict[str, Any]:
        return {
            self.EPOCH_KEY: self._epoch,
            self.FILE_POSITION_KEY: self._file_position,
            self.ROW_POSITION_KEY: self._row_position,
            self.SKIPPED_ROWS_KEY: dict(self.skipped_rows.counts),
            self.UNREPORTED_SKIPS_KEY: dict(self._unreported_skips),
            self.YIELDED_KEY: self._yielded_in_epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "paths": list(self.paths),
        }
