"""The on-disk format of tokenized multimodal samples: Parquet shards.

A data set is one or more Parquet files ("shards"). Each row is one sample::

    sample_id  int64, not null          unique within the data set
    segments   list<struct<             the sample's parts, in stored order
                 modality: string,      "text" or a non-text modality name such as "image", "speech"
                 tokens:   list<int32>  see below
               >>, not null

Text segments hold token ids of the base model's tokenizer, without BOS/EOS. Non-text segments hold
CODE INDICES of that modality's codebook (0 to num_codes - 1), not vocabulary ids, so a shard does
not depend on the model's vocabulary size. The data pipeline maps codes to vocabulary ids with
``VocabularyLayout.encode_codes`` and adds the modality's delimiters around each span.

The Parquet key-value metadata of every file describes how its tokens were made::

    mol_tune.format_version        "1"
    mol_tune.dataset               data set name, e.g. "sklearn_digits"
    mol_tune.text_tokenizer        name of the text tokenizer, e.g. "SmolLM2-135M-Instruct"
    mol_tune.text_tokenizer_sha256 sha256 of its tokenizer.json, or "" if unknown
    mol_tune.modalities            JSON object: name -> {"num_codes", "codebook_dim", "codebook_fingerprint"}

``codebook_fingerprint`` is the sha256 of the codebook's float32 bytes (see
``mol_tune.data.image_vq.codebook_fingerprint``). A model set up with another codebook must not
read the shard, and the reader rejects it.

Shards of one data set share their metadata and may be many. Each is written to a temporary
file and renamed when complete, so a crashed writer leaves no truncated shard behind. Row groups
contain ``row_group_size`` rows, so a reader could read a large shard in parts.
"""

import bisect
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq

from mol_tune.data import bad_input
from mol_tune.data.bad_input import BadInputError, check_on_error
from mol_tune.vocab import TEXT, VocabularyLayout

FORMAT_VERSION = 1

SEGMENT_TYPE = pa.struct(
    [pa.field("modality", pa.string(), nullable=False), pa.field("tokens", pa.list_(pa.int32()), nullable=False)]
)
SCHEMA = pa.schema(
    [pa.field("sample_id", pa.int64(), nullable=False), pa.field("segments", pa.list_(SEGMENT_TYPE), nullable=False)]
)

_KEY_PREFIX = "mol_tune."
_REQUIRED_KEYS = ("format_version", "dataset", "text_tokenizer", "modalities")

# The commands that write shards, for the next step of an error about a missing or a broken shard.
# prepare-digits and prepare-text keep an output that they find up to date unless given --force,
# and make-shards keeps the shards that its conversion.json records.
WRITE_SHARDS_COMMANDS = (
    "`mol-tune prepare-digits` or `mol-tune prepare-text` for the bundled data sets, "
    "`mol-tune make-shards` for your own data"
)
REWRITE_SHARDS_COMMANDS = (
    "`mol-tune prepare-digits --force` or `mol-tune prepare-text --force` for the bundled data sets, "
    "`mol-tune make-shards` into an empty output folder for your own data"
)


def _error_text(error: BaseException) -> str:
    """Return an error's message without its final period, so a sentence can follow it."""
    return str(error).rstrip().rstrip(".")


class ShardError(BadInputError):
    """A shard cannot be read, or a row in it is invalid. The message names the file and the row.

    ``reason`` is one of the reasons in ``mol_tune.data.bad_input``, e.g. ``"code_out_of_range"``.
    """


class Segment(NamedTuple):
    """One part of a sample: text token ids, or code indices of a non-text modality."""

    modality: str
    tokens: Sequence[int]


@dataclass(frozen=True)
class CodebookInfo:
    """The codebook a non-text modality's codes index into.

    Args:
        num_codes (int): codebook size.
        codebook_dim (int): dimension of one codebook vector.
        codebook_fingerprint (str): sha256 of the codebook's float32 bytes.
    """

    num_codes: int
    codebook_dim: int
    codebook_fingerprint: str


@dataclass(frozen=True)
class ShardInfo:
    """The metadata of a shard.

    Args:
        dataset (str): data set name.
        text_tokenizer (str): name of the tokenizer that made the text segments.
        modalities (Dict[str, CodebookInfo]): non-text modalities the shard may contain.
        text_tokenizer_sha256 (str): sha256 of the text tokenizer's ``tokenizer.json``, "" if unknown.
    """

    dataset: str
    text_tokenizer: str
    modalities: Dict[str, CodebookInfo] = field(default_factory=dict)
    text_tokenizer_sha256: str = ""

    def to_metadata(self) -> Dict[bytes, bytes]:
        """Return the Parquet key-value metadata that stores this info."""
        values = {
            "format_version": str(FORMAT_VERSION),
            "dataset": self.dataset,
            "text_tokenizer": self.text_tokenizer,
            "text_tokenizer_sha256": self.text_tokenizer_sha256,
            "modalities": json.dumps({name: asdict(info) for name, info in self.modalities.items()}, sort_keys=True),
        }
        return {(_KEY_PREFIX + key).encode(): value.encode() for key, value in values.items()}

    @classmethod
    def from_metadata(cls, metadata: Optional[Mapping[bytes, bytes]], path: str) -> "ShardInfo":
        """Parse the key-value metadata of the shard at ``path``.

        Raises:
            ShardError: if a key is missing, the format version is unknown or a value is malformed.
        """
        values = {}
        for key, value in (metadata or {}).items():
            key = key.decode()
            if key.startswith(_KEY_PREFIX):
                values[key[len(_KEY_PREFIX) :]] = value.decode()
        missing = [_KEY_PREFIX + key for key in _REQUIRED_KEYS if key not in values]
        if missing:
            raise ShardError(
                f"Invalid shard {path}: metadata keys {missing} are missing. "
                "Write shards with mol_tune.data.shards.ShardWriter.",
                reason=bad_input.INVALID_SHARD,
            )
        if values["format_version"] != str(FORMAT_VERSION):
            raise ShardError(
                f"Invalid shard {path}: format version {values['format_version']!r}, but this version of "
                f"mol_tune reads version {FORMAT_VERSION}. Write the shards again: {REWRITE_SHARDS_COMMANDS}.",
                reason=bad_input.INVALID_SHARD,
            )
        try:
            modalities = {
                name: CodebookInfo(int(spec["num_codes"]), int(spec["codebook_dim"]), str(spec["codebook_fingerprint"]))
                for name, spec in json.loads(values["modalities"]).items()
            }
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ShardError(
                f"Invalid shard {path}: metadata key {_KEY_PREFIX}modalities = {values['modalities']!r} "
                f"is malformed ({error!r}).",
                reason=bad_input.INVALID_SHARD,
            ) from None
        return cls(
            dataset=values["dataset"],
            text_tokenizer=values["text_tokenizer"],
            modalities=modalities,
            text_tokenizer_sha256=values.get("text_tokenizer_sha256", ""),
        )


def _as_segments(segments: Sequence[Any]) -> List[Segment]:
    result = []
    for segment in segments:
        if isinstance(segment, Mapping):
            result.append(Segment(segment["modality"], segment["tokens"]))
        else:
            modality, tokens = segment
            result.append(Segment(modality, tokens))
    return result


def validate_sample(
    info: ShardInfo,
    segments: Sequence[Union[Segment, Mapping[str, Any]]],
    path: str,
    row: int,
    text_vocab_size: Optional[int] = None,
) -> None:
    """Check one sample against its shard's metadata.

    Args:
        info (ShardInfo): metadata of the shard.
        segments (Sequence[Union[Segment, Mapping[str, Any]]]): the sample's segments.
        path (str): shard file, for the error message.
        row (int): 0-based row in the file, for the error message.
        text_vocab_size (Optional[int]): if given, text ids must be below it. Default: None.

    Raises:
        ShardError: if the sample has no segments, a segment has no tokens, a modality is not in
            the metadata, a code is outside its codebook or a text id is outside the vocabulary.
    """
    where = f"Invalid sample in shard {path}, row {row}"
    segments = _as_segments(segments)
    if not segments:
        raise ShardError(
            f"{where}: the sample is empty (no segments). Remove the row from the input data, or skip bad "
            "rows with on_error: skip.",
            reason=bad_input.EMPTY_SAMPLE,
        )
    for index, (modality, tokens) in enumerate(segments):
        if len(tokens) == 0:
            raise ShardError(
                f"{where}: segment {index} ({modality}) has no tokens. Remove the row from the input data, or "
                "skip bad rows with on_error: skip.",
                reason=bad_input.EMPTY_SAMPLE,
            )
        low, high = min(tokens), max(tokens)
        if modality == TEXT:
            if low < 0 or (text_vocab_size is not None and high >= text_vocab_size):
                raise ShardError(
                    f"{where}: text segment {index} has ids from {low} to {high}, outside the text vocabulary "
                    f"[0, {text_vocab_size}). Tokenize the data with the model's tokenizer.",
                    reason=bad_input.TEXT_ID_OUT_OF_RANGE,
                )
            continue
        if modality not in info.modalities:
            known = [TEXT] + sorted(info.modalities)
            raise ShardError(
                f"{where}: segment {index} has unknown modality {modality!r}. The shard's metadata lists {known}.",
                reason=bad_input.UNKNOWN_MODALITY,
            )
        num_codes = info.modalities[modality].num_codes
        if low < 0 or high >= num_codes:
            bad = low if low < 0 else high
            raise ShardError(
                f"{where}: segment {index} ({modality}) has code {bad}, outside the codebook of {num_codes} codes "
                f"(0 to {num_codes - 1}). Re-tokenize the data with the model's codebook.",
                reason=bad_input.CODE_OUT_OF_RANGE,
            )


def check_shard_compatible(
    info: ShardInfo,
    path: str,
    layout: VocabularyLayout,
    codebook_fingerprints: Optional[Mapping[str, str]] = None,
) -> None:
    """Check that a model with ``layout`` and the given codebooks can read the shard.

    Args:
        info (ShardInfo): metadata of the shard.
        path (str): shard file, for the error message.
        layout (VocabularyLayout): the model's vocabulary layout.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality name -> fingerprint of the
            codebook the model was set up with. None skips the fingerprint check. Default: None.

    Raises:
        ShardError: if a shard modality is missing from the layout, its codebook size or dimension
            differs, or its codebook fingerprint differs from the model's.
    """
    for name, codebook in info.modalities.items():
        try:
            modality = layout.modality(name)
        except KeyError:
            raise ShardError(
                f"Invalid shard {path}: it contains modality {name!r}, but the model has "
                f"{layout.modality_names}. Add the modality to the model config or drop the shard.",
                reason=bad_input.UNKNOWN_MODALITY,
            ) from None
        if (modality.num_codes, modality.codebook_dim) != (codebook.num_codes, codebook.codebook_dim):
            raise ShardError(
                f"Invalid shard {path}: modality {name!r} has {codebook.num_codes} codes of dimension "
                f"{codebook.codebook_dim}, but the model has {modality.num_codes} of dimension "
                f"{modality.codebook_dim}. The shard was tokenized with another codebook. Either set {name!r} in "
                f"model.modalities of the config to num_codes: {codebook.num_codes}, codebook_dim: "
                f"{codebook.codebook_dim} and load the tokenizer that made the shard (tokenizers.{name}), or "
                "re-tokenize the data with the model's codebook.",
                reason=bad_input.CODEBOOK_MISMATCH,
            )
        if codebook_fingerprints is None:
            continue
        expected = codebook_fingerprints.get(name)
        if expected is None:
            raise ShardError(
                f"Invalid shard {path}: no codebook fingerprint was given for modality {name!r}, "
                f"only for {sorted(codebook_fingerprints)}. Give the fingerprint of every modality's codebook.",
                reason=bad_input.CODEBOOK_MISMATCH,
            )
        if expected != codebook.codebook_fingerprint:
            raise ShardError(
                f"Invalid shard {path}: the {name} codebook fingerprint {codebook.codebook_fingerprint} differs "
                f"from the model's {expected}. The shard was tokenized with another codebook. Either load the "
                f"tokenizer that made the shard (tokenizers.{name} in the config), or re-tokenize the data with "
                f"the model's {name} tokenizer (`mol-tune make-shards`, or `mol-tune prepare-digits --force` "
                "for the digits).",
                reason=bad_input.CODEBOOK_MISMATCH,
            )


class ShardWriter:
    """Write samples into one shard, checking each against the metadata.

    The file appears at ``path`` only when ``close`` (or leaving the ``with`` block) succeeds.

    Args:
        path (str): output Parquet file.
        info (ShardInfo): metadata stored in the file.
        row_group_size (int): rows per Parquet row group. Default: 1024.
    """

    def __init__(self, path: str, info: ShardInfo, row_group_size: int = 1024):
        self.path = path
        self.info = info
        self.row_group_size = row_group_size
        self.num_rows = 0
        self._tmp_path = f"{path}.tmp-{os.getpid()}"
        self._buffer: List[Dict[str, Any]] = []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._writer = pq.ParquetWriter(self._tmp_path, SCHEMA.with_metadata(info.to_metadata()))

    def write(self, sample_id: int, segments: Sequence[Union[Segment, Mapping[str, Any]]]) -> None:
        """Append one sample.

        Raises:
            ShardError: if the sample is invalid, as ``validate_sample`` checks.
        """
        segments = _as_segments(segments)
        validate_sample(self.info, segments, self.path, self.num_rows)
        self._buffer.append(
            {
                "sample_id": int(sample_id),
                "segments": [{"modality": s.modality, "tokens": [int(t) for t in s.tokens]} for s in segments],
            }
        )
        self.num_rows += 1
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self._writer.schema))
            self._buffer = []

    def close(self) -> None:
        """Write the remaining rows and move the finished file to ``path``."""
        self._flush()
        self._writer.close()
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._writer.close()
        if os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_shard_info(path: str) -> ShardInfo:
    """Read the metadata of a shard without reading its rows.

    Raises:
        ShardError: if the file cannot be read as Parquet or its metadata is invalid.
    """
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as error:
        raise ShardError(
            f"Failed to read shard {path}: {_error_text(error)}. Check the path, or write the shards again: "
            f"{REWRITE_SHARDS_COMMANDS}.",
            reason=bad_input.UNREADABLE_FILE,
        ) from None
    for expected in SCHEMA:
        if schema.get_field_index(expected.name) < 0 or not schema.field(expected.name).type.equals(expected.type):
            raise ShardError(
                f"Invalid shard {path}: column {expected.name!r} is missing or not of type {expected.type}. "
                f"The file has schema {schema.remove_metadata()}.",
                reason=bad_input.INVALID_SHARD,
            )
    return ShardInfo.from_metadata(schema.metadata, path)


def read_row_group(
    parquet_file: pq.ParquetFile, path: str, group: int, first_row: int, columns: Optional[Sequence[str]] = None
) -> pa.Table:
    """Read one row group of a shard.

    Args:
        parquet_file (pq.ParquetFile): the open shard.
        path (str): shard file, for the error message.
        group (int): row group index.
        first_row (int): the group's first row in the file, for the error message.
        columns (Optional[Sequence[str]]): columns to read, or None for all. Default: None.

    Returns:
        pa.Table: the group's rows.

    Raises:
        ShardError: with reason ``unreadable_file`` and the group's row range, if the group is damaged.
    """
    try:
        return parquet_file.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as error:
        last_row = first_row + parquet_file.metadata.row_group(group).num_rows - 1
        raise ShardError(
            f"Failed to read shard {path}, rows {first_row} to {last_row}: {_error_text(error)}. The file is "
            f"damaged. Skip damaged rows with data.on_error: skip, or write the shards again: "
            f"{REWRITE_SHARDS_COMMANDS}.",
            reason=bad_input.UNREADABLE_FILE,
        ) from None


class ShardReader:
    """Random access to the validated samples of one shard.

    On first access, all rows are read into memory, one row group at a time, so a damaged group is
    reported with its row range. With ``on_error="raise"`` a damaged group raises at once. With
    ``"skip"`` the intact groups are kept, and each row of a damaged group raises a ``ShardError``
    with reason ``unreadable_file`` when it is accessed, so the caller can skip and count it.

    NOTE: a whole shard is kept in memory while it is read. Write shards small enough for that
    (for example a few hundred MB), or add row-group streaming here before using larger ones.

    Args:
        path (str): Parquet shard.
        layout (Optional[VocabularyLayout]): if given, the shard must fit it (``check_shard_compatible``)
            and text ids must be below its base vocabulary size. Default: None.
        codebook_fingerprints (Optional[Mapping[str, str]]): model codebook fingerprints per
            modality, checked when ``layout`` is given. None skips the check. Default: None.
        on_error (str): ``"raise"`` or ``"skip"`` for a damaged row group, as described above. Default: "raise".

    Raises:
        ShardError: if the file is unreadable or does not fit the layout or codebooks.
        ValueError: if ``on_error`` is unknown.
    """

    def __init__(
        self,
        path: str,
        layout: Optional[VocabularyLayout] = None,
        codebook_fingerprints: Optional[Mapping[str, str]] = None,
        on_error: str = "raise",
    ):
        self.path = path
        self.on_error = check_on_error(on_error)
        self.info = read_shard_info(path)
        if layout is not None:
            check_shard_compatible(self.info, path, layout, codebook_fingerprints)
        self._text_vocab_size = layout.base_vocab_size if layout is not None else None
        try:
            self.num_rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as error:
            raise ShardError(
                f"Failed to read shard {path}: {_error_text(error)}. Write the shards again: "
                f"{REWRITE_SHARDS_COMMANDS}.",
                reason=bad_input.UNREADABLE_FILE,
            ) from None
        # Per row group: its first row, and its (sample_id, segments) columns, or None if it is damaged.
        self._group_starts: Optional[List[int]] = None
        self._groups: List[Optional[Tuple[pa.Array, pa.Array]]] = []
        self._damaged: Dict[int, str] = {}

    def __len__(self) -> int:
        return self.num_rows

    def _load(self) -> None:
        parquet_file = pq.ParquetFile(self.path)
        starts, groups, first_row = [], [], 0
        for group in range(parquet_file.num_row_groups):
            try:
                table = read_row_group(parquet_file, self.path, group, first_row)
                groups.append((table.column("sample_id").combine_chunks(), table.column("segments").combine_chunks()))
            except ShardError as error:
                if self.on_error == "raise":
                    raise
                self._damaged[group] = str(error)
                groups.append(None)
            starts.append(first_row)
            first_row += parquet_file.metadata.row_group(group).num_rows
        self._groups = groups
        self._group_starts = starts

    def __getitem__(self, row: int) -> Dict[str, Any]:
        """Return row ``row`` as ``{"sample_id": int, "segments": [{"modality": str, "tokens": [int]}]}``.

        Raises:
            IndexError: if ``row`` is out of range.
            ShardError: if the sample is invalid or its row group is damaged.
        """
        if not 0 <= row < self.num_rows:
            raise IndexError(f"Row {row} is out of range: shard {self.path} has {self.num_rows} rows.")
        if self._group_starts is None:
            self._load()
        group = bisect.bisect_right(self._group_starts, row) - 1
        if self._groups[group] is None:
            raise ShardError(self._damaged[group], reason=bad_input.UNREADABLE_FILE)
        sample_ids, all_segments = self._groups[group]
        offset = row - self._group_starts[group]
        segments = all_segments[offset].as_py() or []
        validate_sample(self.info, segments, self.path, row, self._text_vocab_size)
        return {"sample_id": sample_ids[offset].as_py(), "segments": segments}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for row in range(self.num_rows):
            yield self[row]
