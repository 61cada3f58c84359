"""Reading the items of a raw data set: manifest rows (CSV, TSV, JSONL) or the samples of a text file.

Each item is one future sample. Items are numbered from 0 in file order, and that index becomes
the sample id, so a rerun numbers them the same way. A row that cannot be parsed (invalid JSON, a
missing field) is still an item: it carries a ``BadInputError`` instead of fields, so the
converter can raise it or skip and count it like any other bad input.

Manifest formats, chosen by file suffix:

- ``.csv`` / ``.tsv``: a header row, then one item per row. Fields are strings.
- ``.jsonl``: one JSON object per line. Blank lines are ignored.
- ``.txt`` (text only): one item per line, or per paragraph (lines separated by blank lines).
  Blank lines are separators and never items.
"""

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence

from mol_tune.data import bad_input
from mol_tune.data.bad_input import BadInputError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIX = ".jsonl"
TEXT_SUFFIX = ".txt"
TEXT_UNITS = ("line", "paragraph")


@dataclass(frozen=True)
class RawItem:
    """One item of a raw data set.

    Args:
        index (int): 0-based item number in file order, used as the sample id.
        line (int): 1-based line of the input file where the item starts.
        fields (Dict[str, Any]): the item's fields, e.g. ``{"image": ..., "caption": ...}``; empty if ``error`` is set.
        error (Optional[BadInputError]): why the item could not be parsed, or None. Default: None.
    """

    index: int
    line: int
    fields: Dict[str, Any]
    error: Optional[BadInputError] = None


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_fields(fields: Dict[str, Any], required: Sequence[str], where: str) -> Optional[BadInputError]:
    missing = [name for name in required if fields.get(name) is None]
    if missing:
        present = sorted(name for name, value in fields.items() if value is not None)
        return BadInputError(
            f"Invalid row at {where}: fields {missing} are missing; the row has {present}. "
            "Fill them in or remove the row.",
            bad_input.INVALID_ROW,
        )
    wrong = [name for name in required if not isinstance(fields[name], str)]
    if wrong:
        return BadInputError(
            f"Invalid row at {where}: fields {wrong} must be strings, got "
            f"{[type(fields[name]).__name__ for name in wrong]}.",
            bad_input.INVALID_ROW,
        )
    return None


def _iter_table(path: str, required: Sequence[str]) -> Iterator[RawItem]:
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file, delimiter=TABLE_SUFFIXES[_suffix(path)])
        columns = reader.fieldnames or []
        missing = [name for name in required if name not in columns]
        if missing:
            raise ValueError(
                f"Invalid manifest {path}: columns {missing} are missing; its header has {columns}. "
                f"Add a header row with the columns {list(required)}."
            )
        index = 0
        # csv counts physical lines read so far, so a row starts one line after the previous row ended.
        start_line = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start_line}"
            fields = {key: value for key, value in row.items() if key is not None}
            error = _check_fields(fields, required, where)
            if error is None and None in row:
                error = BadInputError(
                    f"Invalid row at {where}: it has {len(row[None])} more fields than the header "
                    f"{columns}. Quote values that contain the delimiter, or remove the extra fields.",
                    bad_input.INVALID_ROW,
                )
            if error is None and reader.line_num > start_line:
                # A quoted value may hold a line break, but an unclosed quote swallows every row after it.
                error = BadInputError(
                    f"Invalid row at {where}: it runs over lines {start_line} to {reader.line_num}. Close the "
                    "quote that opens on its first line, or remove the line breaks inside its values.",
                    bad_input.INVALID_ROW,
                )
            yield RawItem(index, start_line, {} if error else fields, error)
            index += 1
            start_line = reader.line_num + 1


def _iter_jsonl(path: str, required: Sequence[str]) -> Iterator[RawItem]:
    with open(path, encoding="utf-8") as file:
        index = 0
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                fields, parse_error = {}, BadInputError(
                    f"Invalid row at {where}: it is not valid JSON ({error}). Fix or remove the line.",
                    bad_input.INVALID_ROW,
                )
            else:
                if isinstance(fields, dict):
                    parse_error = _check_fields(fields, required, where)
                else:
                    parse_error = BadInputError(
                        f"Invalid row at {where}: expected a JSON object with {list(required)}, got "
                        f"{type(fields).__name__}.",
                        bad_input.INVALID_ROW,
                    )
            yield RawItem(index, line_number, {} if parse_error else fields, parse_error)
            index += 1


def _iter_text_lines(path: str, unit: str) -> Iterator[RawItem]:
    with open(path, encoding="utf-8") as file:
        index, paragraph, paragraph_line = 0, [], 0
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if unit == "line":
                if line.strip():
                    yield RawItem(index, line_number, {"text": line})
                    index += 1
                continue
            if line.strip():
                if not paragraph:
                    paragraph_line = line_number
                paragraph.append(line)
            elif paragraph:
                yield RawItem(index, paragraph_line, {"text": "\n".join(paragraph)})
                index, paragraph = index + 1, []
        if paragraph:
            yield RawItem(index, paragraph_line, {"text": "\n".join(paragraph)})


def iter_items(path: str, required: Sequence[str], text_unit: str = "line") -> Iterator[RawItem]:
    """Yield the items of a manifest or text file in file order.

    Args:
        path (str): ``.csv``, ``.tsv`` or ``.jsonl`` manifest, or a ``.txt`` file if ``required`` is ``["text"]``.
        required (Sequence[str]): fields every item must have, e.g. ``["image", "caption"]``.
        text_unit (str): for a ``.txt`` file, ``"line"`` or ``"paragraph"`` per item. Default: "line".

    Yields:
        RawItem: the next item, with ``error`` set if the row could not be parsed.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the format is not supported, a CSV header lacks a required column, or the
            file is not valid UTF-8.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Input file not found: {path}. Check --input.")
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"Invalid text_unit: {text_unit!r}. Use one of {TEXT_UNITS}.")
    suffix = _suffix(path)
    if suffix in TABLE_SUFFIXES:
        items = _iter_table(path, required)
    elif suffix == JSONL_SUFFIX:
        items = _iter_jsonl(path, required)
    elif suffix == TEXT_SUFFIX and list(required) == ["text"]:
        items = _iter_text_lines(path, text_unit)
    else:
        allowed = sorted(TABLE_SUFFIXES) + [JSONL_SUFFIX] + ([TEXT_SUFFIX] if list(required) == ["text"] else [])
        raise ValueError(f"Invalid input {path}: suffix {suffix!r} is not supported. Use one of {allowed}.")
    try:
        yield from items
    except UnicodeDecodeError as error:
        raise ValueError(f"Failed to read {path}: it is not valid UTF-8 ({error}). Save it as UTF-8.") from None


def count_items(path: str, required: Sequence[str], text_unit: str = "line") -> int:
    """Return the number of items ``iter_items`` yields, without keeping them."""
    return sum(1 for _ in iter_items(path, required, text_unit))
