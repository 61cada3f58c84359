"""Tests of the text-only data preparation: paragraph extraction, chunking and the written shards."""

import json
import os
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mol_tune.data.prepare_text import (
    chunk_paragraph,
    default_source_dir,
    extract_paragraphs,
    main,
    prepare_text,
    source_files,
)
from mol_tune.data.shards import ShardReader

DOCUMENT = """.. _toy_dataset:

Toy plants dataset
------------------

**Data Set Characteristics:**

:Number of Instances: 150 (50 in each of three classes)
:Creator: Somebody

============== ==== ====
                Min  Max
============== ==== ====
sepal length:   4.3  7.9
============== ==== ====

The famous toy database was first used by a botanist. The data set contains three classes
of fifty instances each, where each class refers to a type of plant. One class is
linearly separable from the other two; the latter are NOT separable from each other.

The loader returns a :class:`~sklearn.utils.Bunch` with the ``data`` and target arrays. Use it like this::

    >>> from sklearn.datasets import load_toy
    >>> toy = load_toy()

>>> toy.data.shape
(150, 4)

Short line here.

.. dropdown:: References

  - Someone, A. "The use of multiple measurements in taxonomic problems" Annual Eugenics, 7, 1936.
"""

EXPECTED_PARAGRAPHS = [
    "The famous toy database was first used by a botanist. The data set contains three classes of fifty "
    "instances each, where each class refers to a type of plant. One class is linearly separable from the "
    "other two; the latter are NOT separable from each other.",
    "The loader returns a ~sklearn.utils.Bunch with the data and target arrays. Use it like this:",
    '- Someone, A. "The use of multiple measurements in taxonomic problems" Annual Eugenics, 7, 1936.',
]


def words(text):
    return re.findall(r"\w+|[^\w\s]", text)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text-source")
    (directory / "toy.rst").write_text(DOCUMENT)
    (directory / "notes.txt").write_text(
        "A second file holds plain text. It has two sentences in one paragraph, and nothing else.\n"
    )
    (directory / "ignored.py").write_text("print('not text')\n")
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, source_dir):
    """A word-level tokenizer with every word of the source files in its vocabulary."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for path in source_files(source_dir):
        for word in words(open(path).read()):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path_factory.mktemp("toy-tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)


def test_extract_keeps_only_prose():
    assert extract_paragraphs(DOCUMENT) == EXPECTED_PARAGRAPHS


def test_chunks_fit_and_cover_paragraph(tokenizer_dir):
    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    paragraph = EXPECTED_PARAGRAPHS[0]
    for max_tokens in (5, 12, 30, 200):
        chunks = chunk_paragraph(paragraph, tokenizer, max_tokens)
        assert all(0 < len(chunk) <= max_tokens for chunk in chunks)
        assert [t for chunk in chunks for t in chunk] == [tokenizer.token_to_id(w) for w in words(paragraph)]
    # With room for two sentences, a chunk ends at a sentence end.
    chunks = chunk_paragraph(paragraph, tokenizer, 30)
    assert [tokenizer.id_to_token(chunk[-1]) for chunk in chunks] == [".", ".", "."]


def test_prepare_writes_disjoint_splits(tokenizer_dir, source_dir, tmp_path):
    summary = prepare_text(tokenizer_dir, str(tmp_path), source_dir=source_dir, max_tokens=12, validation_fraction=0.25)
    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    expected = [
        chunk
        for paragraph in EXPECTED_PARAGRAPHS + extract_paragraphs(open(os.path.join(source_dir, "notes.txt")).read())
        for chunk in chunk_paragraph(paragraph, tokenizer, 12)
    ]

    rows = {}
    for split in ("train", "validation"):
        reader = ShardReader(str(tmp_path / f"{split}.parquet"))
        assert reader.info.modalities == {}
        assert reader.num_rows == summary["splits"][split]["num_samples"]
        for sample in reader:
            assert [s["modality"] for s in sample["segments"]] == ["text"]
            assert sample["sample_id"] not in rows
            rows[sample["sample_id"]] = sample["segments"][0]["tokens"]
    assert summary["splits"]["validation"]["num_samples"] == round(0.25 * len(expected))
    # Files are read in sorted order: notes.txt before toy.rst.
    notes = len(chunk_paragraph(extract_paragraphs(open(os.path.join(source_dir, "notes.txt")).read())[0], tokenizer, 12))
    assert sorted(rows) == list(range(len(expected)))
    assert [rows[i] for i in range(len(expected))] == expected[-notes:] + expected[:-notes]
    assert set(summary["settings"]["sources"]) == {"notes.txt", "toy.rst"}


def test_second_run_rewrites_nothing(tokenizer_dir, source_dir, tmp_path):
    prepare_text(tokenizer_dir, str(tmp_path), source_dir=source_dir)
    before = {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)}
    prepare_text(tokenizer_dir, str(tmp_path), source_dir=source_dir)
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)} == before

    summary = prepare_text(tokenizer_dir, str(tmp_path), source_dir=source_dir, max_tokens=7)
    assert summary["settings"]["max_tokens"] == 7
    assert json.loads((tmp_path / "dataset.json").read_text())["settings"]["max_tokens"] == 7


def test_main_parses_arguments(tokenizer_dir, source_dir, tmp_path):
    main(["--tokenizer-dir", tokenizer_dir, "--output-dir", str(tmp_path), "--source-dir", source_dir,
          "--max-tokens", "9", "--seed", "3"])  # fmt: skip
    settings = json.loads((tmp_path / "dataset.json").read_text())["settings"]
    assert (settings["max_tokens"], settings["seed"]) == (9, 3)


def test_main_writes_into_cache(tokenizer_dir, source_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOL_TUNE_CACHE", str(tmp_path / "cache"))
    main(["--tokenizer-dir", tokenizer_dir, "--source-dir", source_dir])
    assert (tmp_path / "cache" / "data" / "sklearn_text" / "dataset.json").is_file()


def test_default_source_is_sklearn_prose():
    files = source_files(default_source_dir())
    assert any(path.endswith("iris.rst") for path in files)
    paragraphs = [p for path in files for p in extract_paragraphs(open(path, encoding="utf-8").read())]
    assert len(paragraphs) > 50
    assert not [p for p in paragraphs if p.startswith(">>>") or "::" in p or "====" in p]


def test_missing_source_raises(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="No .rst or .txt file found"):
        prepare_text(tokenizer_dir, str(tmp_path / "out"), source_dir=str(tmp_path))
