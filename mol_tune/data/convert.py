"""Convert a raw data set into Parquet shards: images with captions, speech with transcripts, or plain text.

Inputs, by ``modality``:

- ``image``: a manifest (``.csv``, ``.tsv`` or ``.jsonl``) with the fields ``image`` (a file path,
  relative to ``root``) and ``caption``. Images are read with Pillow, or with NumPy for ``.npy``.
- ``speech``: a manifest with ``audio`` (a PCM WAV file) and ``transcript``.
- ``text``: a ``.txt`` file with one sample per line or per paragraph, or a ``.jsonl`` file with ``text``.

Each sample becomes a text segment (caption, transcript or text) tokenized with the base model's
Hugging Face tokenizer, then, for image and speech, a segment of codes from the modality's
tokenizer (see ``mol_tune.data.modality_tokenizer``). The shard format is in ``mol_tune.data.shards``.

Writes into the output folder::

    shard-00000.parquet, ...   item i of the input goes to shard i // samples_per_shard, with sample id i
    conversion.json            settings, and per finished shard its file and counts of samples,
                               tokens and skipped items per reason (see mol_tune.data.conversion_state)

Items are converted one shard at a time, and ``conversion.json`` records a shard once its file is
complete, with a digest of its input items. A rerun with the same settings keeps each recorded shard
whose items are unchanged and converts the rest. So a killed run loses at most one shard of work,
and a run stopped by a bad manifest row continues after the row is fixed. A shard file is written
under a temporary name and renamed when complete, so a file named ``shard-*.parquet`` is never
half-written.

NOTE: a rerun does not notice a media file that changed after its shard was recorded. Delete the
output folder to convert such files again.

Run it as ``mol-tune make-shards`` (see ``main``).
"""

import argparse
import collections
import concurrent.futures
import itertools
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import yaml
from tqdm import tqdm

from mol_tune.cache import default_cache_dir
from mol_tune.data import bad_input
from mol_tune.data.bad_input import BadInputError, SkipCounter, check_on_error
from mol_tune.data.conversion_state import (
    SHARD_FILE,
    chunk_digest,
    load_state,
    remove_stale_shards,
    remove_unfinished_files,
    save_state,
)
from mol_tune.data.item_encoder import IMAGE, MEDIA_FIELD, MODALITIES, SPEECH, TEXT_FIELD, ItemEncoder, locate_error
from mol_tune.data.manifest import TEXT_UNITS, RawItem, count_items, iter_items
from mol_tune.data.media import IMAGE_MODES
from mol_tune.data.modality_tokenizer import COMPONENT_KEY, describe_spec, load_modality_tokenizer
from mol_tune.data.prepare_digits import load_text_tokenizer
from mol_tune.data.shards import FORMAT_VERSION, CodebookInfo, ShardInfo, ShardWriter
from mol_tune.vocab import TEXT

log = logging.getLogger(__name__)

PATCH_VQ_LOADER = "mol_tune.data.image_vq.PatchVQTokenizer.load"


def _default_tokenizer_dir() -> str:
    return os.path.join(default_cache_dir(), "models", "SmolLM2-135M-Instruct")


@dataclass
class ConvertConfig:
    """Settings of one conversion. The command line and the YAML file of ``mol-tune make-shards`` set them.

    Args:
        modality (str): ``"image"``, ``"speech"`` or ``"text"``, the kind of samples in the input.
        input (str): the manifest or text file.
        output_dir (str): folder for the shards and ``conversion.json``, created if needed.
        dataset (str): data set name stored in the shards' metadata.
        tokenizer_dir (str): Hugging Face tokenizer folder of the base model, with ``tokenizer.json``.
            Default: the SmolLM2-135M-Instruct folder that ``mol-tune prepare-model`` writes.
        image_tokenizer (Union[str, Mapping[str, Any], None]): for ``image``: a ``PatchVQTokenizer``
            folder, an import path of a callable that returns the tokenizer, or a mapping with
            ``_component_`` and keyword arguments. Default: None.
        speech_tokenizer (Union[str, Mapping[str, Any], None]): for ``speech``: an import path or a
            mapping, as for ``image_tokenizer``. Default: None.
        root (str): folder that relative media paths in the manifest start from. Default: the input's folder.
        image_mode (str): ``"L"`` (grey levels) or ``"RGB"``. Default: "L".
        image_size (Optional[int]): side in pixels that images are resized to. Default: the image
            tokenizer's ``image_size`` attribute if it has one, else no resizing.
        text_unit (str): for a ``.txt`` input, ``"line"`` or ``"paragraph"`` per sample. Default: "line".
        samples_per_shard (int): input items per shard, so each shard has at most this many samples.
            Default: 10000.
        row_group_size (int): rows per Parquet row group. Default: 1024.
        on_error (str): ``"raise"`` to stop at the first bad item, or ``"skip"`` to skip, count and log
            it. Default: "raise".
        num_workers (int): threads that read media files, or 0 to read them in the main thread. The
            tokenizers always run in the main thread. Default: 0.
    """

    modality: str
    input: str
    output_dir: str
    dataset: str
    tokenizer_dir: str = field(default_factory=_default_tokenizer_dir)
    image_tokenizer: Union[str, Mapping[str, Any], None] = None
    speech_tokenizer: Union[str, Mapping[str, Any], None] = None
    root: str = ""
    image_mode: str = "L"
    image_size: Optional[int] = None
    text_unit: str = "line"
    samples_per_shard: int = 10000
    row_group_size: int = 1024
    on_error: str = "raise"
    num_workers: int = 0

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"Invalid modality: {self.modality!r}. Use one of {MODALITIES}.")
        self.input = os.path.expanduser(str(self.input))
        self.output_dir = os.path.expanduser(str(self.output_dir))
        self.tokenizer_dir = os.path.expanduser(str(self.tokenizer_dir))
        self.root = os.path.expanduser(str(self.root)) if self.root else os.path.dirname(os.path.abspath(self.input))
        check_on_error(self.on_error)
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"Invalid image_mode: {self.image_mode!r}. Use one of {IMAGE_MODES}.")
        if self.text_unit not in TEXT_UNITS:
            raise ValueError(f"Invalid text_unit: {self.text_unit!r}. Use one of {TEXT_UNITS}.")
        for name in ("samples_per_shard", "row_group_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}. It must be positive.")
        if self.num_workers < 0:
            raise ValueError(f"Invalid num_workers: {self.num_workers}. Use 0 or more.")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"Invalid image_size: {self.image_size}. It must be positive.")
        for modality in (IMAGE, SPEECH):
            is_set = getattr(self, f"{modality}_tokenizer") is not None
            if modality == self.modality and not is_set:
                raise ValueError(
                    f"Missing {modality}_tokenizer: modality {modality!r} needs the tokenizer of its codes."
                )
            if modality != self.modality and is_set:
                raise ValueError(f"Invalid {modality}_tokenizer: it is set, but the modality is {self.modality!r}.")

    @property
    def tokenizer_spec(self) -> Optional[Dict[str, Any]]:
        """The component spec of the modality's tokenizer, or None for text."""
        if self.modality == TEXT:
            return None
        value = getattr(self, f"{self.modality}_tokenizer")
        if isinstance(value, str) and os.path.isdir(os.path.expanduser(value)):
            if self.modality != IMAGE:
                raise ValueError(
                    f"Invalid speech_tokenizer: {value} is a folder, and mol_tune has no built-in speech "
                    "tokenizer that loads one. Give the import path of a callable that returns the tokenizer."
                )
            return {COMPONENT_KEY: PATCH_VQ_LOADER, "directory": os.path.expanduser(value)}
        return describe_spec(value)


def _ordered_map(
    function, items: Iterable[Any], pool: Optional[concurrent.futures.Executor], window: int
) -> Iterator[Any]:
    """Yield ``function(item)`` in input order, with at most ``window`` items in flight in ``pool``."""
    if pool is None:
        yield from map(function, items)
        return
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks(items: Iterator[RawItem], size: int) -> Iterator[Tuple[int, List[RawItem]]]:
    for index in itertools.count():
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield index, chunk


def _settings(config: ConvertConfig, info: ShardInfo) -> Dict[str, Any]:
    """Return the settings that decide the shards' content. A rerun continues only if they are unchanged."""
    return {
        "format_version": FORMAT_VERSION,
        "modality": config.modality,
        "root": os.path.abspath(config.root),
        "dataset": config.dataset,
        "text_tokenizer_sha256": info.text_tokenizer_sha256,
        "modalities": {name: asdict(codebook) for name, codebook in info.modalities.items()},
        "image_mode": config.image_mode if config.modality == IMAGE else None,
        "image_size": config.image_size,
        "text_unit": config.text_unit,
        "samples_per_shard": config.samples_per_shard,
    }


class _ShardSetWriter:
    """Write the shards of one conversion, one shard per ``samples_per_shard`` input items."""

    def __init__(self, config: ConvertConfig, info: ShardInfo, encoder: ItemEncoder, skips: SkipCounter):
        self.config = config
        self.info = info
        self.encoder = encoder
        self.skips = skips

    def write(
        self,
        shard_index: int,
        items: List[RawItem],
        pool: Optional[concurrent.futures.Executor],
        progress: tqdm,
    ) -> Dict[str, Any]:
        """Convert ``items`` into shard ``shard_index`` and return its record for ``conversion.json``.

        Raises:
            BadInputError: if an item is bad and ``on_error`` is ``"raise"``.
        """
        file_name = SHARD_FILE.format(shard_index)
        path = os.path.join(self.config.output_dir, file_name)
        record = {
            "index": shard_index,
            "file": file_name,
            "items_sha256": chunk_digest(items),
            "first_item": items[0].index,
            "num_items": len(items),
            "num_samples": 0,
            "num_text_tokens": 0,
            "num_codes": 0,
            "skipped": {},
        }
        writer = ShardWriter(path, self.info, row_group_size=self.config.row_group_size)
        try:
            window = max(1, 4 * self.config.num_workers)
            for item, media, error in _ordered_map(self.encoder.load, items, pool, window):
                progress.update(1)
                try:
                    if error is not None:
                        raise error
                    segments = self.encoder.encode(item, media)
                except BadInputError as bad:
                    bad = locate_error(self.config.input, item, bad)
                    if self.config.on_error == "raise":
                        progress_note = (
                            f"Shards before {file_name} are complete, and a rerun continues from there."
                            if shard_index
                            else "No shard is complete yet."
                        )
                        raise BadInputError(
                            f"{bad} Fix the item, or pass --on-error skip to skip bad items. {progress_note}",
                            bad.reason,
                        ) from None
                    self.skips.record(bad)
                    record["skipped"][bad.reason] = record["skipped"].get(bad.reason, 0) + 1
                    continue
                writer.write(item.index, segments)
                record["num_samples"] += 1
                record["num_text_tokens"] += sum(len(s.tokens) for s in segments if s.modality == TEXT)
                record["num_codes"] += sum(len(s.tokens) for s in segments if s.modality != TEXT)
        except BaseException:
            writer.abort()
            raise
        if record["num_samples"]:
            writer.close()
        else:
            # Every item was skipped: write no file, and drop one that an earlier run left at this name.
            writer.abort()
            record["file"] = None
            if os.path.exists(path):
                os.remove(path)
        return record


def summarize(state: Dict[str, Any]) -> Dict[str, Any]:
    """Return the totals of a conversion's state: samples, tokens, skipped items per reason, files."""
    shards = state["shards"]
    skipped: Dict[str, int] = {}
    for record in shards:
        for reason, count in record["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {
        "dataset": state["settings"]["dataset"],
        "modality": state["settings"]["modality"],
        "num_items": sum(record["num_items"] for record in shards),
        "num_samples": sum(record["num_samples"] for record in shards),
        "num_text_tokens": sum(record["num_text_tokens"] for record in shards),
        "num_codes": sum(record["num_codes"] for record in shards),
        "skipped": dict(sorted(skipped.items())),
        "files": [record["file"] for record in shards if record["file"]],
    }


def _print_summary(summary: Dict[str, Any], output_dir: str) -> None:
    modality = summary["modality"]
    print(f"Dataset {summary['dataset']} ({modality}) in {output_dir}")
    codes = f", {summary['num_codes']} {modality} codes" if modality != TEXT else ""
    print(
        f"  wrote {summary['num_samples']} samples of {summary['num_items']} items in {len(summary['files'])} "
        f"shards: {summary['num_text_tokens']} text tokens{codes}"
    )
    skipped = sum(summary["skipped"].values())
    if skipped:
        print(f"  skipped {skipped} items:")
        for reason, count in summary["skipped"].items():
            print(f"    {reason}: {count}")
    else:
        print("  skipped 0 items")


def make_shards(config: ConvertConfig) -> Dict[str, Any]:
    """Convert the input of ``config`` into shards, continuing an earlier run into the same folder.

    Args:
        config (ConvertConfig): the conversion's settings.

    Returns:
        Dict[str, Any]: the totals, as ``summarize`` returns them.

    Raises:
        FileNotFoundError: if the input or the text tokenizer is not found.
        ValueError: if a setting or the tokenizer is invalid, the input has no items, the output
            folder contains shards of other settings, or no item could be converted.
        BadInputError: if an item is bad and ``on_error`` is ``"raise"``; the message names the
            input line and the media file.
    """
    text_tokenizer, tokenizer_name, tokenizer_sha256 = load_text_tokenizer(config.tokenizer_dir)
    modality_tokenizer = None
    modalities = {}
    if config.modality != TEXT:
        modality_tokenizer = load_modality_tokenizer(config.modality, config.tokenizer_spec)
        modalities[config.modality] = CodebookInfo(
            int(modality_tokenizer.num_codes), int(modality_tokenizer.codebook_dim), modality_tokenizer.fingerprint
        )
    info = ShardInfo(
        dataset=config.dataset,
        text_tokenizer=tokenizer_name,
        text_tokenizer_sha256=tokenizer_sha256,
        modalities=modalities,
    )
    required = [name for name in (MEDIA_FIELD[config.modality], TEXT_FIELD[config.modality]) if name]
    total = count_items(config.input, required, config.text_unit)
    if total == 0:
        raise ValueError(f"Invalid input {config.input}: it has no items. Check the file and --modality.")

    os.makedirs(config.output_dir, exist_ok=True)
    state = load_state(config.output_dir, _settings(config, info), info)
    remove_unfinished_files(config.output_dir)
    written = _convert(config, info, state, ItemEncoder(
        config.modality, text_tokenizer, modality_tokenizer, config.root, config.image_mode, config.image_size
    ), required, total)
    remove_stale_shards(config.output_dir, state)
    if written == 0:
        print(f"Shards in {config.output_dir} are up to date, so nothing was rewritten.")
    summary = summarize(state)
    _print_summary(summary, config.output_dir)
    if summary["num_samples"] == 0:
        raise ValueError(
            f"No sample was written: all {summary['num_items']} items of {config.input} were skipped "
            f"({summary['skipped']}). Check the input and the tokenizers."
        )
    return summary


def _convert(
    config: ConvertConfig,
    info: ShardInfo,
    state: Dict[str, Any],
    encoder: ItemEncoder,
    required: Sequence[str],
    total: int,
) -> int:
    """Write every shard that ``state`` lacks or whose items changed, and return how many were written."""
    previous_skips: Dict[str, int] = {}
    for record in state["shards"]:
        for reason, count in record["skipped"].items():
            previous_skips[reason] = previous_skips.get(reason, 0) + count
    skips = SkipCounter("item", log, counts=previous_skips)
    writer = _ShardSetWriter(config, info, encoder, skips)

    items = iter_items(config.input, required, config.text_unit)
    written = 0
    pool = concurrent.futures.ThreadPoolExecutor(config.num_workers) if config.num_workers > 0 else None
    try:
        with tqdm(total=total, desc=f"Converting {config.dataset}", unit="item") as progress:
            for shard_index, chunk in _chunks(items, config.samples_per_shard):
                if shard_index < len(state["shards"]):
                    if state["shards"][shard_index]["items_sha256"] == chunk_digest(chunk):
                        progress.update(len(chunk))
                        continue
                    log.info("The items of shard %d changed, so it and later shards are written again.", shard_index)
                    del state["shards"][shard_index:]
                state["shards"].append(writer.write(shard_index, chunk, pool, progress))
                written += 1
                save_state(config.output_dir, state)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    # The input may now have fewer shards than an earlier run recorded.
    num_shards = -(-total // config.samples_per_shard)
    if len(state["shards"]) > num_shards:
        del state["shards"][num_shards:]
        save_state(config.output_dir, state)
    return written


def _parse_tokenizer_args(values: Sequence[str]) -> Dict[str, Any]:
    result = {}
    for value in values:
        key, separator, text = value.partition("=")
        if not separator or not key:
            raise ValueError(f"Invalid --tokenizer-arg {value!r}: use KEY=VALUE, e.g. directory=/path/to/tokenizer.")
        result[key] = yaml.safe_load(text)
    return result


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert images with captions, speech with transcripts, or plain text into Parquet shards "
        "of text token ids and media codes. A rerun into the same --output-dir continues after the last "
        "complete shard. Options may also come from a YAML file (--config) with the same names, "
        "underscores for dashes; options on the command line win.",
    )
    # Defaults are None, so a value from --config is only replaced by an option actually given.
    parser.add_argument("--config", help="YAML file with any of the options below, e.g. `modality: speech`.")
    parser.add_argument("--modality", choices=MODALITIES, help="Kind of samples in the input.")
    parser.add_argument(
        "--input",
        help="Manifest (.csv, .tsv, .jsonl) with image+caption or audio+transcript fields, or for text a "
        ".txt file or a .jsonl file with a text field.",
    )
    parser.add_argument("--output-dir", help="Folder for the shards and conversion.json.")
    parser.add_argument("--dataset", help="Data set name stored in the shards' metadata.")

    parser.add_argument(
        "--tokenizer-dir",
        help=f"Hugging Face tokenizer folder of the base model (default: {_default_tokenizer_dir()}).",
    )
    parser.add_argument(
        "--image-tokenizer",
        help="PatchVQTokenizer folder, or import path of a callable that returns the image tokenizer.",
    )
    parser.add_argument("--speech-tokenizer", help="Import path of a callable that returns the speech tokenizer.")
    parser.add_argument(
        "--tokenizer-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="Keyword argument for the image or speech tokenizer's callable; repeat for more. VALUE is read as YAML.",
    )

    parser.add_argument("--root", help="Folder that relative media paths start from (default: the input's folder).")
    parser.add_argument(
        "--image-mode", choices=IMAGE_MODES, help="Read images as grey levels (L) or colour (RGB) (default: L)."
    )
    parser.add_argument(
        "--image-size", type=int, help="Resize images to this side in pixels (default: the tokenizer's image_size)."
    )
    parser.add_argument("--text-unit", choices=TEXT_UNITS, help="For a .txt input, one sample per line or paragraph.")

    parser.add_argument("--samples-per-shard", type=int, help="Input items per shard (default: 10000).")
    parser.add_argument("--row-group-size", type=int, help="Rows per Parquet row group (default: 1024).")
    parser.add_argument(
        "--on-error",
        choices=bad_input.ON_ERROR_POLICIES,
        help="raise: stop at the first bad item; skip: skip, count and log bad items (default: raise).",
    )
    parser.add_argument("--num-workers", type=int, help="Threads that read media files (default: 0, the main thread).")
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> ConvertConfig:
    """Build a ``ConvertConfig`` from command-line arguments and the YAML file that ``--config`` names.

    Raises:
        SystemExit: if an option is malformed (argparse's usage error).
        ValueError: if the YAML file has unknown keys or a setting is invalid or missing.
    """
    parser = _build_parser()
    args = vars(parser.parse_args(argv))
    values: Dict[str, Any] = {}
    config_path = args.pop("config")
    if config_path:
        with open(os.path.expanduser(config_path)) as file:
            values = yaml.safe_load(file) or {}
        if not isinstance(values, dict):
            raise ValueError(f"Invalid config file {config_path}: expected a mapping of option names to values.")
    tokenizer_args = _parse_tokenizer_args(args.pop("tokenizer_arg") or [])
    values.update({key: value for key, value in args.items() if value is not None})

    known = {f.name for f in fields(ConvertConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Invalid config keys {unknown} in {config_path}. Known keys: {sorted(known)}.")
    missing = [name for name in ("modality", "input", "output_dir", "dataset") if not values.get(name)]
    if missing:
        options = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"Missing settings: {options}. Give them as options or in the --config file.")
    if tokenizer_args:
        key = f"{values['modality']}_tokenizer"
        spec = values.get(key)
        if spec is None:
            raise ValueError(f"Invalid --tokenizer-arg: --{key.replace('_', '-')} is not given.")
        values[key] = {**describe_spec(spec), **tokenizer_args}
    return ConvertConfig(**values)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``mol-tune make-shards``.

    Examples::

        mol-tune make-shards --modality image --input photos/manifest.csv --image-tokenizer tokenizers/image \\
            --dataset photos --output-dir data/photos --on-error skip
        mol-tune make-shards --config speech.yaml --num-workers 4
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "make-shards"
    # As with `tune run`, a tokenizer module in the current folder can be named by import path.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        config = parse_config(argv)
        with logging_redirect_tqdm():
            make_shards(config)
    except (BadInputError, ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
