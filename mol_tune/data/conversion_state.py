"""The record of a resumable conversion: ``conversion.json`` in the output folder.

The state is a JSON object::

    settings   the settings that decide the shards' content (``mol_tune.data.convert``); a rerun
               with other settings is rejected
    shards     one record per finished shard, in order: its file (null if every item was
               skipped), ``items_sha256`` (a digest of its input items), the counts of items,
               samples, text tokens and codes, and ``skipped`` (reason -> count)

A shard is recorded only after its file is complete, and the state file itself is replaced
atomically, so after a kill the state lists only complete shards.
"""

import glob
import hashlib
import json
import logging
import os
from typing import Any, Dict, Sequence

import pyarrow.parquet as pq

from mol_tune.data.manifest import RawItem
from mol_tune.data.shards import ShardError, ShardInfo, read_shard_info

log = logging.getLogger(__name__)

STATE_FILE = "conversion.json"
SHARD_FILE = "shard-{:05d}.parquet"
SHARD_GLOB = "shard-*.parquet"


def chunk_digest(items: Sequence[RawItem]) -> str:
    """Return a sha256 of the items of one shard, so a rerun can tell whether they changed."""
    content = [(item.index, item.line, item.fields, str(item.error) if item.error else None) for item in items]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def save_state(output_dir: str, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``conversion.json`` through a temporary file, so a kill never leaves it half-written."""
    path = os.path.join(output_dir, STATE_FILE)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "w") as file:
        json.dump(state, file, indent=2)
    os.replace(tmp_path, path)


def _shard_is_intact(path: str, info: ShardInfo, num_samples: int) -> bool:
    try:
        return read_shard_info(path) == info and pq.ParquetFile(path).metadata.num_rows == num_samples
    except (ShardError, OSError):
        return False


def load_state(output_dir: str, settings: Dict[str, Any], info: ShardInfo) -> Dict[str, Any]:
    """Return the state of an earlier run into ``output_dir`` with the same settings, or a new state.

    Recorded shards whose file is missing or differs from ``info`` are dropped from the state,
    together with the shards after them, so they are written again.

    Raises:
        ValueError: if the folder contains shards of other settings, ``.parquet`` files of no
            conversion, or an unreadable state file.
    """
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.isfile(path):
        strangers = sorted(glob.glob(os.path.join(output_dir, "*.parquet")))
        if strangers:
            raise ValueError(
                f"Invalid output folder {output_dir}: it contains .parquet files such as {strangers[0]} but no "
                f"{STATE_FILE}, so they were not written by make-shards. Choose an empty folder."
            )
        return {"settings": settings, "shards": []}
    try:
        with open(path) as file:
            state = json.load(file)
        saved = state["settings"]
        state["shards"] = list(state["shards"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Invalid {path}: {type(error).__name__}: {error}. Delete the output folder to convert again."
        ) from None
    differences = [
        f"{key}: {saved.get(key)!r} there, {value!r} now" for key, value in settings.items() if saved.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"Invalid output folder {output_dir}: its shards were made with other settings ("
            + "; ".join(differences)
            + "). Convert into another --output-dir, or delete the folder to start again."
        )
    for position, record in enumerate(state["shards"]):
        shard_path = os.path.join(output_dir, record["file"]) if record["file"] else None
        if shard_path is not None and not _shard_is_intact(shard_path, info, record["num_samples"]):
            log.warning(
                "Shard %s is missing or differs from %s, so it and the shards after it are written again.",
                shard_path,
                STATE_FILE,
            )
            state["shards"] = state["shards"][:position]
            break
    return state


def remove_unfinished_files(output_dir: str) -> None:
    """Remove temporary files of shards and states that a killed run left behind. They never count as shards."""
    for pattern in (SHARD_GLOB + ".tmp-*", STATE_FILE + ".tmp-*"):
        for path in glob.glob(os.path.join(output_dir, pattern)):
            log.info("Removing unfinished file %s from an earlier run.", path)
            os.remove(path)


def remove_stale_shards(output_dir: str, state: Dict[str, Any]) -> None:
    """Remove shard files that the state does not list, e.g. from an earlier run over a longer input."""
    listed = {record["file"] for record in state["shards"] if record["file"]}
    for path in sorted(glob.glob(os.path.join(output_dir, SHARD_GLOB))):
        if os.path.basename(path) not in listed:
            log.info("Removing shard %s, which this conversion no longer produces.", path)
            os.remove(path)
