"""Tests of the Parquet shard format: round trip, metadata and errors that name file and row."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mol_tune.data.shards import (
    SCHEMA,
    CodebookInfo,
    ShardError,
    ShardInfo,
    ShardReader,
    ShardWriter,
    read_shard_info,
)
from mol_tune.data.source import expand_shard_paths
from mol_tune.vocab import VocabularyLayout

FINGERPRINT = "ab" * 32
INFO = ShardInfo(
    dataset="toy",
    text_tokenizer="toy-tokenizer",
    modalities={"image": CodebookInfo(num_codes=8, codebook_dim=4, codebook_fingerprint=FINGERPRINT)},
)
LAYOUT = VocabularyLayout(100, ({"name": "image", "num_codes": 8, "codebook_dim": 4},))

SAMPLES = [
    (10, [("text", [5, 6, 7]), ("image", [0, 1, 7, 3])]),
    (11, [("image", [2, 2]), ("text", [99])]),
    (-4, [("text", [1])]),
]


def write_raw_shard(path, rows, info=INFO):
    """Write rows straight with pyarrow, bypassing ShardWriter's checks."""
    schema = SCHEMA.with_metadata(info.to_metadata())
    table = pa.Table.from_pylist(
        [
            {"sample_id": sample_id, "segments": [{"modality": m, "tokens": t} for m, t in segments]}
            for sample_id, segments in rows
        ],
        schema=schema,
    )
    pq.write_table(table, path)


def test_round_trip(tmp_path):
    path = str(tmp_path / "shard.parquet")
    with ShardWriter(path, INFO, row_group_size=2) as writer:
        for sample_id, segments in SAMPLES:
            writer.write(sample_id, segments)
    reader = ShardReader(path, LAYOUT, {"image": FINGERPRINT})
    assert len(reader) == len(SAMPLES)
    assert pq.ParquetFile(path).num_row_groups == 2
    for row, (sample_id, segments) in enumerate(SAMPLES):
        sample = reader[row]
        assert sample["sample_id"] == sample_id
        assert [(s["modality"], s["tokens"]) for s in sample["segments"]] == segments


def test_schema_is_standard_columnar(tmp_path):
    path = str(tmp_path / "shard.parquet")
    with ShardWriter(path, INFO) as writer:
        writer.write(*SAMPLES[0])
    schema = pq.read_schema(path)
    assert schema.field("sample_id").type == pa.int64()
    segment = schema.field("segments").type.value_type
    assert segment.field("modality").type == pa.string()
    assert segment.field("tokens").type == pa.list_(pa.int32())


def test_metadata_keys(tmp_path):
    path = str(tmp_path / "shard.parquet")
    with ShardWriter(path, INFO) as writer:
        writer.write(*SAMPLES[0])
    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items()}
    assert metadata["mol_tune.dataset"] == "toy"
    assert metadata["mol_tune.text_tokenizer"] == "toy-tokenizer"
    modalities = json.loads(metadata["mol_tune.modalities"])
    assert modalities == {"image": {"num_codes": 8, "codebook_dim": 4, "codebook_fingerprint": FINGERPRINT}}
    assert read_shard_info(path) == INFO


def test_writer_leaves_no_file_on_error(tmp_path):
    path = tmp_path / "shard.parquet"
    with pytest.raises(ShardError):
        with ShardWriter(str(path), INFO) as writer:
            writer.write(*SAMPLES[0])
            writer.write(12, [("image", [8])])
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_code_out_of_range(tmp_path):
    path = str(tmp_path / "shard.parquet")
    writer = ShardWriter(path, INFO)
    writer.write(*SAMPLES[0])
    with pytest.raises(ShardError, match=r"row 1.*code 8"):
        writer.write(12, [("image", [1, 8])])
    writer.abort()


def test_unreadable_file_names_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(ShardError, match="broken.parquet"):
        ShardReader(str(path))


def test_missing_metadata_names_file(tmp_path):
    path = str(tmp_path / "plain.parquet")
    pq.write_table(pa.Table.from_pylist([{"sample_id": 1, "segments": []}], schema=SCHEMA), path)
    with pytest.raises(ShardError, match=r"plain.parquet.*mol_tune.dataset"):
        ShardReader(path)


def test_empty_sample_names_row(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, [SAMPLES[0], SAMPLES[1], (12, [])])
    reader = ShardReader(path)
    reader[1]
    with pytest.raises(ShardError, match=r"shard\.parquet, row 2: the sample is empty"):
        reader[2]


def test_empty_segment_names_row(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, [(12, [("text", [1]), ("image", [])])])
    with pytest.raises(ShardError, match=r"row 0: segment 1 \(image\) has no tokens"):
        ShardReader(path)[0]


def test_unknown_modality_names_row(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, [SAMPLES[0], (12, [("speech", [1, 2])])])
    with pytest.raises(ShardError, match=r"shard\.parquet, row 1: segment 0 has unknown modality 'speech'"):
        ShardReader(path)[1]


def test_code_outside_codebook_names_row(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, [SAMPLES[0], SAMPLES[1], (12, [("text", [3]), ("image", [1, 9])])])
    with pytest.raises(ShardError, match=r"shard\.parquet, row 2: segment 1 \(image\) has code 9"):
        ShardReader(path)[2]


def test_negative_code_names_row(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, [(12, [("image", [-1, 2])])])
    with pytest.raises(ShardError, match=r"row 0: segment 0 \(image\) has code -1"):
        ShardReader(path)[0]


def test_text_id_outside_vocabulary_names_row(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, [SAMPLES[0], (12, [("text", [100])])])
    with pytest.raises(ShardError, match=r"row 1: text segment 0"):
        ShardReader(path, LAYOUT)[1]


def test_fingerprint_mismatch_names_file(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, SAMPLES)
    with pytest.raises(ShardError, match=r"shard\.parquet: the image codebook fingerprint"):
        ShardReader(path, LAYOUT, {"image": "cd" * 32})


def test_layout_without_modality_names_file(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, SAMPLES)
    text_only = VocabularyLayout(100)
    with pytest.raises(ShardError, match=r"shard\.parquet: it contains modality 'image'"):
        ShardReader(path, text_only)


def test_layout_codebook_size_mismatch(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, SAMPLES)
    layout = VocabularyLayout(100, ({"name": "image", "num_codes": 16, "codebook_dim": 4},))
    with pytest.raises(ShardError, match="has 8 codes of dimension 4, but the model has 16"):
        ShardReader(path, layout)


def test_unreadable_file_message_names_commands(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(ShardError) as caught:
        read_shard_info(str(path))
    message = str(caught.value)
    assert ".." not in message
    assert "`mol-tune prepare-digits --force`" in message
    assert "`mol-tune make-shards`" in message


def test_missing_shard_names_commands(tmp_path):
    for missing in (str(tmp_path / "absent.parquet"), str(tmp_path)):
        with pytest.raises(FileNotFoundError) as caught:
            expand_shard_paths(missing)
        message = str(caught.value)
        assert "`mol-tune prepare-digits`" in message
        assert "`mol-tune prepare-text`" in message
        assert "`mol-tune make-shards`" in message


def test_codebook_size_mismatch_names_fix(tmp_path):
    path = str(tmp_path / "shard.parquet")
    write_raw_shard(path, SAMPLES)
    layout = VocabularyLayout(100, ({"name": "image", "num_codes": 16, "codebook_dim": 4},))
    with pytest.raises(ShardError) as caught:
        ShardReader(path, layout)
    message = str(caught.value)
    assert "model.modalities" in message
    assert "num_codes: 8, codebook_dim: 4" in message
    assert "re-tokenize the data with the model's codebook" in message
