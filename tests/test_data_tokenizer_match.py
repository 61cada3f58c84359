"""The recipe's check that shards were tokenized by the base model's tokenizer."""

import hashlib

import pytest

from mol_tune.data.shards import ShardInfo, ShardWriter
from mol_tune.data.tokenizer_match import check_text_tokenizer


def write_shard(path, tokenizer_sha256):
    info = ShardInfo(dataset="prose", text_tokenizer="some-tokenizer", text_tokenizer_sha256=tokenizer_sha256)
    with ShardWriter(str(path), info) as writer:
        writer.write(0, [{"modality": "text", "tokens": [1, 2, 3]}])


def make_base_folder(tmp_path, content: bytes):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(content)
    return folder, hashlib.sha256(content).hexdigest()


def section(path):
    return {"datasets": [{"name": "prose", "train": [str(path)]}], "seq_len": 16, "batch_size": 1}


def test_same_tokenizer_passes(tmp_path):
    folder, digest = make_base_folder(tmp_path, b'{"model": "a"}')
    write_shard(tmp_path / "a.parquet", digest)
    check_text_tokenizer(section(tmp_path / "a.parquet"), str(folder))


def test_other_tokenizer_names_shard(tmp_path):
    folder, _ = make_base_folder(tmp_path, b'{"model": "a"}')
    other = hashlib.sha256(b'{"model": "b"}').hexdigest()
    write_shard(tmp_path / "b.parquet", other)
    with pytest.raises(ValueError, match=r"b\.parquet of data set 'prose' was tokenized with 'some-tokenizer'"):
        check_text_tokenizer(section(tmp_path / "b.parquet"), str(folder))


def test_unreadable_shard_follows_on_error(tmp_path):
    from mol_tune.data.shards import ShardError

    folder, _ = make_base_folder(tmp_path, b'{"model": "a"}')
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    data = section(broken)
    with pytest.raises(ShardError, match="broken.parquet"):
        check_text_tokenizer(data, str(folder))
    check_text_tokenizer({**data, "on_error": "skip"}, str(folder))
