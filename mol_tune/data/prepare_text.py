"""Prepare a text-only data set: English prose from files, cut into chunks, as text-segment shards.

The default source is the descriptions of scikit-learn's bundled data sets
(``sklearn/datasets/descr/*.rst``): about 5,000 words of real English, installed with
scikit-learn, which mol_tune already needs for the digits. A training mix with this text keeps
the model's text ability exercised while it learns image codes.

Writes into the output folder::

    train.parquet, validation.parquet   shards (format in mol_tune.data.shards), one sample per chunk
                                        of at most max_tokens tokens, each a single text segment
    dataset.json                        settings, source files, split sizes and token counts

Paragraphs are the blank-line separated blocks of each file, without reStructuredText markup,
tables, titles and field lists. A paragraph is cut at sentence ends into chunks that fit
``max_tokens``, and a sentence longer than that is cut into windows of ``max_tokens`` tokens.
Chunks are split at random between training and validation.

Run it as ``python -m mol_tune.data.prepare_text [--tokenizer-dir D] [--output-dir O] [--source-dir S]``.
The defaults are the base model's folder ``<cache>/models/SmolLM2-135M-Instruct`` and
``<cache>/data/sklearn_text``. A second run with the same settings, sources and tokenizer finds
``dataset.json`` and the files intact and does nothing.
"""

import argparse
import glob
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from mol_tune.cache import default_cache_dir
from mol_tune.data.prepare_digits import file_sha256, load_text_tokenizer
from mol_tune.data.shards import FORMAT_VERSION, ShardInfo, ShardReader, ShardWriter
from mol_tune.vocab import TEXT

DATASET_NAME = "sklearn_dataset_descriptions"
SPLITS = ("train", "validation")
SUMMARY_FILE = "dataset.json"
SOURCE_SUFFIXES = (".rst", ".txt")
# Raise when extract_paragraphs or chunk_paragraph changes, so prepared data is made again.
TEXT_RULES_VERSION = 1
# Paragraphs with fewer words are titles, labels or list fragments rather than prose.
MIN_PARAGRAPH_WORDS = 8

_UNDERLINE = re.compile(r"^\s*([=\-~^*+#`.:'\"_])\1{2,}\s*$")
_TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
_FIELD = re.compile(r"^\s*:[^:]+:")
_ROLE = re.compile(r":[a-z]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_MARKUP = re.compile(r"\*\*|``|`_|`|\|[a-z-]+\|")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def default_source_dir() -> str:
    """Return the folder of scikit-learn's data set descriptions."""
    import sklearn.datasets

    return os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")


def source_files(source_dir: str) -> List[str]:
    """Return the ``.rst`` and ``.txt`` files of ``source_dir``, sorted.

    Raises:
        FileNotFoundError: if the folder does not exist or has no such file.
    """
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"Text source folder not found: {source_dir}. Pass --source-dir, a folder of .rst or .txt files.")
    files = sorted(p for p in glob.glob(os.path.join(source_dir, "*")) if p.endswith(SOURCE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"No .rst or .txt file found in {source_dir}. Pass a folder of English text files.")
    return files


def extract_paragraphs(text: str) -> List[str]:
    """Return the prose paragraphs of a reStructuredText or plain text document, markup removed.

    A block is dropped when it is a table, a doctest (``>>>``), the indented literal block after a
    line ending in ``::``, or when it has fewer than ``MIN_PARAGRAPH_WORDS`` words after dropping
    directives (``.. x::``), title underlines and field lists (``:Name: value``).
    """
    paragraphs = []
    in_literal_block = False
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if in_literal_block and lines[0][:1].isspace():
            continue
        in_literal_block = lines[-1].rstrip().endswith("::")
        if lines[0].lstrip().startswith(">>>") or any(_TABLE_BORDER.match(line) for line in lines):
            continue
        kept = [
            line.strip()
            for line in lines
            if line.strip() and not line.lstrip().startswith("..") and not _UNDERLINE.match(line) and not _FIELD.match(line)
        ]
        paragraph = " ".join(kept)
        paragraph = _ROLE.sub(r"\1", paragraph)
        paragraph = _MARKUP.sub("", paragraph)
        paragraph = re.sub(r"\s+", " ", paragraph).strip()
        paragraph = re.sub(r"::$", ":", paragraph)
        if len(paragraph.split()) >= MIN_PARAGRAPH_WORDS:
            paragraphs.append(paragraph)
    return paragraphs


def chunk_paragraph(paragraph: str, tokenizer: Tokenizer, max_tokens: int) -> List[List[int]]:
    """Tokenize a paragraph into chunks of at most ``max_tokens`` ids, cut at sentence ends where possible."""
    chunks: List[List[int]] = []
    current = ""
    for sentence in _SENTENCE_END.split(paragraph):
        candidate = f"{current} {sentence}" if current else sentence
        if len(tokenizer.encode(candidate, add_special_tokens=False).ids) <= max_tokens:
            current = candidate
            continue
        if current:
            chunks.append(tokenizer.encode(current, add_special_tokens=False).ids)
        current = sentence
    if current:
        chunks.append(tokenizer.encode(current, add_special_tokens=False).ids)
    # A sentence longer than max_tokens is one chunk so far; cut it into windows.
    return [chunk[i : i + max_tokens] for chunk in chunks for i in range(0, len(chunk), max_tokens)]


def _settings(files: Sequence[str], seed: int, max_tokens: int, validation_fraction: float, tokenizer_sha256: str) -> Dict:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": DATASET_NAME,
        "text_rules_version": TEXT_RULES_VERSION,
        "seed": seed,
        "max_tokens": max_tokens,
        "validation_fraction": validation_fraction,
        "text_tokenizer_sha256": tokenizer_sha256,
        "sources": {os.path.basename(path): file_sha256(path) for path in files},
    }


def _existing_summary(output_dir: str, settings: Dict) -> Optional[Dict[str, Any]]:
    """Return the summary of a finished preparation with ``settings`` in ``output_dir``, else None."""
    path = os.path.join(output_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            summary = json.load(file)
        if summary.get("settings") != settings:
            return None
        for split in SPLITS:
            reader = ShardReader(os.path.join(output_dir, summary["splits"][split]["file"]))
            if reader.num_rows != summary["splits"][split]["num_samples"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary


def prepare_text(
    tokenizer_dir: str,
    output_dir: str,
    source_dir: Optional[str] = None,
    seed: int = 0,
    max_tokens: int = 96,
    validation_fraction: float = 0.1,
    force: bool = False,
) -> Dict[str, Any]:
    """Cut the source files into tokenized chunks and write the train and validation shards.

    Args:
        tokenizer_dir (str): Hugging Face tokenizer folder of the base model (with ``tokenizer.json``).
        output_dir (str): folder to write into, created if needed.
        source_dir (Optional[str]): folder of ``.rst`` or ``.txt`` files, or None for scikit-learn's
            data set descriptions. Default: None.
        seed (int): seed of the split. Default: 0.
        max_tokens (int): maximum tokens of one chunk, which must leave room for BOS and EOS in
            the training ``seq_len``. Default: 96.
        validation_fraction (float): share of chunks in the validation split, at least one chunk. Default: 0.1.
        force (bool): prepare again even if ``output_dir`` is up to date. Default: False.

    Returns:
        Dict[str, Any]: the content of ``dataset.json``.

    Raises:
        FileNotFoundError: if the tokenizer or the source files are missing.
        ValueError: if ``max_tokens`` or ``validation_fraction`` is invalid, or the sources give
            fewer than two chunks.
    """
    if max_tokens <= 0:
        raise ValueError(f"Invalid max_tokens: {max_tokens}. It must be positive.")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"Invalid validation_fraction: {validation_fraction}. It must be between 0 and 1.")
    source_dir = source_dir or default_source_dir()
    files = source_files(source_dir)
    tokenizer, tokenizer_name, tokenizer_sha256 = load_text_tokenizer(tokenizer_dir)
    settings = _settings(files, seed, max_tokens, validation_fraction, tokenizer_sha256)
    summary = None if force else _existing_summary(output_dir, settings)
    if summary is not None:
        print(f"Text data in {output_dir} is up to date, so nothing is rewritten.")
        _print_summary(summary, output_dir)
        return summary

    # Without dataset.json, a run that fails half-way is never taken for a finished one.
    if os.path.exists(os.path.join(output_dir, SUMMARY_FILE)):
        os.remove(os.path.join(output_dir, SUMMARY_FILE))
    chunks: List[List[int]] = []
    for path in files:
        with open(path, encoding="utf-8") as file:
            for paragraph in extract_paragraphs(file.read()):
                chunks.extend(chunk for chunk in chunk_paragraph(paragraph, tokenizer, max_tokens) if chunk)
    if len(chunks) < 2:
        raise ValueError(f"Invalid text source {source_dir}: it gives {len(chunks)} chunk(s), too few to split.")

    order = np.random.default_rng(seed).permutation(len(chunks))
    num_validation = max(1, int(round(validation_fraction * len(chunks))))
    split_ids = {"validation": sorted(order[:num_validation].tolist()), "train": sorted(order[num_validation:].tolist())}

    info = ShardInfo(
        dataset=DATASET_NAME, text_tokenizer=tokenizer_name, text_tokenizer_sha256=tokenizer_sha256, modalities={}
    )
    split_summaries = {}
    for split in SPLITS:
        file_name = f"{split}.parquet"
        with ShardWriter(os.path.join(output_dir, file_name), info) as writer:
            for sample_id in split_ids[split]:
                writer.write(sample_id, [(TEXT, chunks[sample_id])])
        split_summaries[split] = {
            "file": file_name,
            "num_samples": len(split_ids[split]),
            "num_text_tokens": sum(len(chunks[i]) for i in split_ids[split]),
        }

    summary = {
        "settings": settings,
        "dataset": DATASET_NAME,
        "source_dir": source_dir,
        "text_tokenizer": {"name": tokenizer_name, "sha256": tokenizer_sha256},
        "splits": split_summaries,
    }
    # dataset.json is written last, so its presence marks a complete preparation.
    tmp_path = os.path.join(output_dir, f"{SUMMARY_FILE}.tmp")
    with open(tmp_path, "w") as file:
        json.dump(summary, file, indent=2)
    os.replace(tmp_path, os.path.join(output_dir, SUMMARY_FILE))
    _print_summary(summary, output_dir)
    return summary


def _print_summary(summary: Dict[str, Any], output_dir: str) -> None:
    print(f"Dataset {summary['dataset']} in {output_dir}, from {len(summary['settings']['sources'])} files")
    for split, values in summary["splits"].items():
        print(f"  {split}: {values['num_samples']} chunks, {values['num_text_tokens']} text tokens ({values['file']})")
    print(f"  text tokenizer: {summary['text_tokenizer']['name']}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare English text files as text-only Parquet shards.")
    cache_dir = default_cache_dir()
    parser.add_argument(
        "--tokenizer-dir",
        default=os.path.join(cache_dir, "models", "SmolLM2-135M-Instruct"),
        help="Hugging Face tokenizer folder with tokenizer.json (default: %(default)s).",
    )
    parser.add_argument(
        "--output-dir",
        default=os.path.join(cache_dir, "data", "sklearn_text"),
        help="Folder for the shards and dataset.json (default: %(default)s).",
    )
    parser.add_argument(
        "--source-dir",
        default=None,
        help="Folder of .rst or .txt files (default: scikit-learn's data set descriptions).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split (default: 0).")
    parser.add_argument("--max-tokens", type=int, default=96, help="Maximum tokens of one chunk (default: 96).")
    parser.add_argument(
        "--validation-fraction", type=float, default=0.1, help="Share of chunks for validation (default: 0.1)."
    )
    parser.add_argument("--force", action="store_true", help="Prepare again even if the output is up to date.")
    args = parser.parse_args(argv)
    prepare_text(
        args.tokenizer_dir,
        args.output_dir,
        source_dir=args.source_dir,
        seed=args.seed,
        max_tokens=args.max_tokens,
        validation_fraction=args.validation_fraction,
        force=args.force,
    )


if __name__ == "__main__":
    main()
