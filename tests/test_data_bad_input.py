"""Tests of bad input in the shard converter and the shard reader: raise by default, skip and count on request.

Each case plants known bad items among good ones, so the expected samples and per-reason counts
are known without running the code under test.
"""

import json
import logging
import os
import wave

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from tokenizers import Tokenizer, models, pre_tokenizers
from torchdata.nodes import Loader, ParallelMapper

from media_tokenizers import FrameKMeansTokenizer
from mol_tune.data.bad_input import BadInputError, SkipCounter
from mol_tune.data.config import build_training_loader, build_validation_loaders
from mol_tune.data.conversion_state import STATE_FILE
from mol_tune.data.convert import ConvertConfig, make_shards, parse_config
from mol_tune.data.image_vq import PatchVQTokenizer
from mol_tune.data.mixture import measure_dataset_profile
from mol_tune.data.pipeline import build_dataloader, build_mixture_dataloader
from mol_tune.data.samples import SampleBuilder
from mol_tune.data.shards import SCHEMA, CodebookInfo, ShardError, ShardInfo, ShardReader, ShardWriter
from mol_tune.data.source import ShardSource
from mol_tune.vocab import VocabularyLayout

WORDS = ["<unk>", "a", "digit", "one", "two", "three", "four", "yes"]
FSDD_DIR = "/work/shared/data/fsdd/recordings"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path_factory.mktemp("words")
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def image_tokenizer_dir(tmp_path_factory):
    images = (load_digits().images[:300] / 16.0).astype(np.float32)
    directory = str(tmp_path_factory.mktemp("vq"))
    PatchVQTokenizer(num_codes=16).fit(images).save(directory)
    return directory


def write_png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def image_config(folder, tokenizer_dir, image_tokenizer, **overrides):
    values = dict(
        modality="image", input=str(folder / "manifest.jsonl"), output_dir=str(folder / "out"), dataset="bad",
        tokenizer_dir=tokenizer_dir, image_tokenizer=image_tokenizer, samples_per_shard=4,
    )  # fmt: skip
    values.update(overrides)
    return ConvertConfig(**values)


@pytest.fixture
def bad_image_folder(tmp_path):
    """A JSONL manifest of 12 lines: 6 good images and one bad item per reason.

    Returns:
        (folder, {sample id of each good item}, {reason: count})
    """
    (tmp_path / "img").mkdir()
    for i in range(8):
        write_png(tmp_path / "img" / f"{i}.png", i)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG not an image")
    np.save(tmp_path / "img" / "too_bright.npy", np.full((8, 8), 3.0, dtype=np.float32))
    lines = [
        {"image": "img/0.png", "caption": "a digit one"},  # 0 good
        {"image": "img/corrupt.png", "caption": "a digit"},  # 1 unreadable_file
        {"image": "img/1.png", "caption": "two"},  # 2 good
        {"image": "img/absent.png", "caption": "three"},  # 3 missing_file
        {"image": "img/2.png", "caption": "   "},  # 4 empty_sample
        '{"image": "img/3.png", "caption": ',  # 5 invalid_row (not JSON)
        {"image": "img/3.png"},  # 6 invalid_row (no caption)
        {"image": "img/4.png", "caption": "four"},  # 7 good
        {"image": "img/too_bright.npy", "caption": "yes"},  # 8 invalid_values
        {"image": "img/5.png", "caption": "yes"},  # 9 good
        {"image": "img/6.png", "caption": "a digit"},  # 10 good
        {"image": "img/7.png", "caption": "one"},  # 11 good
    ]
    with open(tmp_path / "manifest.jsonl", "w") as file:
        for line in lines:
            file.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    good = {0, 2, 7, 9, 10, 11}
    reasons = {"unreadable_file": 1, "missing_file": 1, "empty_sample": 1, "invalid_row": 2, "invalid_values": 1}
    return tmp_path, good, reasons


def test_corrupt_image_raises_naming_line(bad_image_folder, tokenizer_dir, image_tokenizer_dir):
    folder, _, _ = bad_image_folder
    with pytest.raises(BadInputError) as caught:
        make_shards(image_config(folder, tokenizer_dir, image_tokenizer_dir))
    message = str(caught.value)
    assert caught.value.reason == "unreadable_file"
    assert "manifest.jsonl:2 (sample 1)" in message
    assert "corrupt.png" in message
    assert "--on-error skip" in message


def test_raise_keeps_finished_shards(bad_image_folder, tokenizer_dir, image_tokenizer_dir):
    folder, _, _ = bad_image_folder
    with pytest.raises(BadInputError):
        make_shards(image_config(folder, tokenizer_dir, image_tokenizer_dir))
    # The first bad item is in shard 0, so no shard is complete and no partial file is left.
    assert sorted(os.listdir(folder / "out")) == []


def test_skip_counts_each_reason(bad_image_folder, tokenizer_dir, image_tokenizer_dir, caplog):
    folder, good, reasons = bad_image_folder
    with caplog.at_level(logging.WARNING, logger="mol_tune.data.convert"):
        summary = make_shards(image_config(folder, tokenizer_dir, image_tokenizer_dir, on_error="skip"))

    assert summary["skipped"] == reasons
    assert summary["num_samples"] == len(good)
    assert summary["num_items"] == 12
    ids = sorted(row["sample_id"] for name in summary["files"] for row in ShardReader(str(folder / "out" / name)))
    assert ids == sorted(good)
    for name in ("corrupt.png", "absent.png", "too_bright.npy", "manifest.jsonl:6", "manifest.jsonl:7"):
        assert name in caplog.text, name
    with open(folder / "out" / STATE_FILE) as file:
        per_shard = [record["skipped"] for record in json.load(file)["shards"]]
    assert per_shard == [
        {"unreadable_file": 1, "missing_file": 1},
        {"empty_sample": 1, "invalid_row": 2},
        {"invalid_values": 1},
    ]


@pytest.fixture
def good_manifest(bad_image_folder):
    folder, _, _ = bad_image_folder
    with open(folder / "good.jsonl", "w") as file:
        for i in range(8):
            file.write(json.dumps({"image": f"img/{i}.png", "caption": "a digit"}) + "\n")
    return folder


def test_code_outside_codebook(good_manifest, tokenizer_dir, image_tokenizer_dir):
    folder = good_manifest
    # good.jsonl has no bad items, so encode call 2 is sample 1 on line 2.
    spec = {"_component_": "media_tokenizers.OutOfRangeImageTokenizer", "directory": image_tokenizer_dir, "bad_calls": [2]}
    with pytest.raises(BadInputError, match=r"good\.jsonl:2 \(sample 1\).*code 16 at position 15.*codebook of 16") as caught:
        make_shards(image_config(folder, tokenizer_dir, spec, input=str(folder / "good.jsonl")))
    assert caught.value.reason == "code_out_of_range"


def test_code_outside_codebook_skipped(good_manifest, tokenizer_dir, image_tokenizer_dir):
    folder = good_manifest
    spec = {"_component_": "media_tokenizers.OutOfRangeImageTokenizer", "directory": image_tokenizer_dir, "bad_calls": [2, 5]}
    summary = make_shards(image_config(folder, tokenizer_dir, spec, input=str(folder / "good.jsonl"), on_error="skip"))
    assert summary["skipped"] == {"code_out_of_range": 2}
    ids = sorted(row["sample_id"] for name in summary["files"] for row in ShardReader(str(folder / "out" / name)))
    assert ids == [0, 2, 3, 5, 6, 7]


def test_fixed_row_continues_after_finished_shards(bad_image_folder, tokenizer_dir, image_tokenizer_dir):
    folder, _, _ = bad_image_folder
    lines = [json.dumps({"image": f"img/{i % 8}.png", "caption": "a digit"}) for i in range(10)]
    lines[6] = json.dumps({"image": "img/absent.png", "caption": "a digit"})
    (folder / "fix.jsonl").write_text("\n".join(lines) + "\n")
    config = image_config(folder, tokenizer_dir, image_tokenizer_dir, input=str(folder / "fix.jsonl"))
    with pytest.raises(BadInputError, match=r"fix\.jsonl:7 \(sample 6\).*Shards before shard-00001\.parquet"):
        make_shards(config)
    assert sorted(os.listdir(folder / "out")) == [STATE_FILE, "shard-00000.parquet"]
    first_mtime = os.stat(folder / "out" / "shard-00000.parquet").st_mtime_ns

    lines[6] = json.dumps({"image": "img/6.png", "caption": "a digit"})
    (folder / "fix.jsonl").write_text("\n".join(lines) + "\n")
    summary = make_shards(config)
    assert summary["num_samples"] == 10
    assert os.stat(folder / "out" / "shard-00000.parquet").st_mtime_ns == first_mtime


def test_all_items_bad_raises(tmp_path, tokenizer_dir, image_tokenizer_dir):
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "nothing.png", "caption": "one"}) + "\n")
    with pytest.raises(ValueError, match=r"No sample was written: all 1 items .*missing_file"):
        make_shards(image_config(tmp_path, tokenizer_dir, image_tokenizer_dir, on_error="skip"))


def test_rate_limited_log(tmp_path, tokenizer_dir, image_tokenizer_dir, caplog):
    write_png(tmp_path / "good.png", 0)
    lines = [{"image": "good.png", "caption": "one"}] + [{"image": f"gone{i}.png", "caption": "one"} for i in range(12)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level(logging.WARNING, logger="mol_tune.data.convert"):
        summary = make_shards(image_config(tmp_path, tokenizer_dir, image_tokenizer_dir, on_error="skip"))
    messages = [record.getMessage() for record in caplog.records if record.name == "mol_tune.data.convert"]
    assert summary["skipped"] == {"missing_file": 12}
    assert sum(m.startswith("Skipped item (missing_file)") for m in messages) == 5
    assert sum("counted and not logged in full" in m for m in messages) == 1
    assert sum(m == "Skipped 10 items for missing_file so far." for m in messages) == 1
    assert len(messages) == 7


def test_skip_counter_logs_powers_of_ten(caplog):
    counter = SkipCounter("row", logging.getLogger("test.skips"), max_logged=3)
    with caplog.at_level(logging.WARNING, logger="test.skips"):
        for i in range(1000):
            counter.record(BadInputError(f"bad row {i}", "empty_sample"))
    messages = [record.getMessage() for record in caplog.records]
    # 3 in full, the "further ones" notice, then counts at 10, 100 and 1000.
    assert len(messages) == 7
    assert messages[-3:] == [f"Skipped {n} rows for empty_sample so far." for n in (10, 100, 1000)]
    assert counter.counts == {"empty_sample": 1000}
    assert counter.summary() == "1000 rows skipped (empty_sample: 1000)"


def test_skip_counter_counts_groups(caplog):
    counter = SkipCounter("row", logging.getLogger("test.groups"), max_logged=5)
    with caplog.at_level(logging.WARNING, logger="test.groups"):
        counter.record(BadInputError("rows 0 to 24 damaged", "unreadable_file"), 25)
        counter.record(BadInputError("rows 25 to 49 damaged", "unreadable_file"), 25)
        counter.record(BadInputError("rows 50 to 129 damaged", "unreadable_file"), 80)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "Skipped 25 rows (unreadable_file): rows 0 to 24 damaged"
    assert "counted and not logged in full" in messages[1]
    # 50 passes no power of ten after 25, and 130 passes 100.
    assert messages[2:] == ["Skipped 130 rows for unreadable_file so far."]
    assert counter.counts == {"unreadable_file": 130}


def write_wav(path, samples, rate=8000):
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(np.asarray(samples, dtype="<i2").tobytes())


@pytest.fixture(scope="module")
def speech_codebook(tmp_path_factory):
    if not os.path.isdir(FSDD_DIR):
        pytest.skip(f"FSDD recordings not found in {FSDD_DIR}")
    from mol_tune.data.media import read_wav

    waveforms = [read_wav(os.path.join(FSDD_DIR, f"{d}_spk4_7.wav"))[0] for d in range(4)]
    path = str(tmp_path_factory.mktemp("units") / "codebook.npy")
    np.save(path, FrameKMeansTokenizer.fit(waveforms, num_codes=8).codebook.numpy())
    return path


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_bad_wav_files(tmp_path, tokenizer_dir, speech_codebook, on_error):
    good = os.path.join(FSDD_DIR, "3_spk5_9.wav")
    write_wav(tmp_path / "empty.wav", [])
    write_wav(tmp_path / "short.wav", np.zeros(100))  # shorter than one frame: the tokenizer returns no codes
    (tmp_path / "noise.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    write_wav(tmp_path / "truncated.wav", np.arange(4000))
    data = (tmp_path / "truncated.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(data[: len(data) // 2])
    rows = [(good, "three"), ("noise.wav", "one"), ("empty.wav", "two"), ("truncated.wav", "three"),
            ("short.wav", "four"), (good, "three")]  # fmt: skip
    (tmp_path / "speech.csv").write_text("audio,transcript\n" + "".join(f"{a},{t}\n" for a, t in rows))
    config = ConvertConfig(
        modality="speech", input=str(tmp_path / "speech.csv"), output_dir=str(tmp_path / "out"), dataset="fsdd",
        tokenizer_dir=tokenizer_dir, on_error=on_error,
        speech_tokenizer={"_component_": "media_tokenizers.load_frame_tokenizer", "path": speech_codebook},
    )  # fmt: skip
    if on_error == "raise":
        with pytest.raises(BadInputError, match=r"speech\.csv:3 \(sample 1\): Failed to read WAV file .*noise\.wav"):
            make_shards(config)
        return
    summary = make_shards(config)
    assert summary["skipped"] == {"unreadable_file": 2, "empty_sample": 2}
    ids = [row["sample_id"] for row in ShardReader(str(tmp_path / "out" / "shard-00000.parquet"))]
    assert ids == [0, 5]


def test_unknown_modality_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid modality: 'smell'. Use one of \('image', 'speech', 'text'\)"):
        ConvertConfig(modality="smell", input="x.csv", output_dir="out", dataset="d")
    (tmp_path / "c.yaml").write_text("modality: smell\ninput: x.csv\noutput_dir: out\ndataset: d\n")
    with pytest.raises(ValueError, match="Invalid modality: 'smell'"):
        parse_config(["--config", str(tmp_path / "c.yaml")])
    with pytest.raises(SystemExit):
        parse_config(["--modality", "smell"])


def test_tokenizer_without_fingerprint_rejected(tmp_path, tokenizer_dir):
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "a.png", "caption": "one"}) + "\n")
    config = image_config(tmp_path, tokenizer_dir, "media_tokenizers.NoFingerprintTokenizer")
    with pytest.raises(ValueError, match=r"NoFingerprintTokenizer lacks \['fingerprint'\]"):
        make_shards(config)


def test_output_of_other_codebook_rejected(good_manifest, tokenizer_dir, image_tokenizer_dir, tmp_path):
    folder = good_manifest
    make_shards(image_config(folder, tokenizer_dir, image_tokenizer_dir, input=str(folder / "good.jsonl")))
    other = str(tmp_path / "other-vq")
    PatchVQTokenizer(num_codes=16, seed=5).fit((load_digits().images[300:600] / 16.0).astype(np.float32)).save(other)
    with pytest.raises(ValueError, match=r"made with other settings \(modalities: .*codebook_fingerprint"):
        make_shards(image_config(folder, tokenizer_dir, other, input=str(folder / "good.jsonl")))


def test_foreign_parquet_in_output_rejected(good_manifest, tokenizer_dir, image_tokenizer_dir):
    folder = good_manifest
    (folder / "out").mkdir()
    (folder / "out" / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"train\.parquet but no conversion\.json"):
        make_shards(image_config(folder, tokenizer_dir, image_tokenizer_dir, input=str(folder / "good.jsonl")))


# ----- the shard reader -----

FINGERPRINT = "cd" * 32
INFO = ShardInfo("toy", "toy", {"image": CodebookInfo(8, 4, FINGERPRINT)})
LAYOUT = VocabularyLayout(50, ({"name": "image", "num_codes": 8, "codebook_dim": 4},))


def good_row(sample_id):
    return {"sample_id": sample_id, "segments": [{"modality": "text", "tokens": [5, 6]}, {"modality": "image", "tokens": [1, 2]}]}


def write_rows(path, rows, info=INFO, row_group_size=None):
    """Write rows straight with pyarrow, bypassing ShardWriter's checks."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(info.to_metadata()))
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def bad_rows_shard(tmp_path):
    rows = [good_row(i) for i in range(8)]
    rows[1]["segments"] = []  # empty_sample
    rows[3]["segments"][1]["tokens"] = [1, 8]  # code_out_of_range
    rows[4]["segments"][1]["modality"] = "smell"  # unknown_modality
    rows[6]["segments"][0]["tokens"] = [50]  # text_id_out_of_range
    counts = {"empty_sample": 1, "code_out_of_range": 1, "unknown_modality": 1, "text_id_out_of_range": 1}
    return write_rows(tmp_path / "bad.parquet", rows), [0, 2, 5, 7], counts


def test_source_raises_on_bad_row(bad_rows_shard):
    path, _, _ = bad_rows_shard
    source = ShardSource(path, LAYOUT, shuffle=False, infinite=False)
    with pytest.raises(ShardError, match=r"bad\.parquet, row 1: the sample is empty") as caught:
        list(source)
    assert caught.value.reason == "empty_sample"


def test_source_skips_bad_rows(bad_rows_shard, caplog):
    path, good, counts = bad_rows_shard
    source = ShardSource(path, LAYOUT, shuffle=False, infinite=False, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="mol_tune.data.source"):
        ids = [sample["sample_id"] for sample in source]
    assert ids == good
    assert source.skipped_rows.counts == counts
    for row in (1, 3, 4, 6):
        assert f"bad.parquet, row {row}:" in caplog.text


def test_skip_counts_survive_resume(bad_rows_shard):
    path, good, counts = bad_rows_shard
    source = ShardSource(path, LAYOUT, shuffle=False, infinite=False, on_error="skip")
    first = [next(source)["sample_id"] for _ in range(2)]  # rows 0 and 2, skipping row 1
    state = source.state_dict()
    resumed = ShardSource(path, LAYOUT, shuffle=False, infinite=False, on_error="skip")
    resumed.reset(state)
    rest = [sample["sample_id"] for sample in resumed]
    assert first + rest == good
    assert resumed.skipped_rows.counts == counts


@pytest.fixture
def mixed_shards(tmp_path):
    good = write_rows(tmp_path / "a_good.parquet", [good_row(i) for i in range(5)])
    garbage = tmp_path / "b_garbage.parquet"
    garbage.write_bytes(b"PAR1 this is no parquet file PAR1")
    other = write_rows(
        tmp_path / "c_other_codebook.parquet",
        [good_row(i) for i in range(10, 13)],
        info=ShardInfo("toy", "toy", {"image": CodebookInfo(8, 4, "ef" * 32)}),
    )
    return [good, str(garbage), other]


def test_source_raises_on_bad_shard(mixed_shards):
    with pytest.raises(ShardError, match=r"b_garbage\.parquet") as caught:
        ShardSource(mixed_shards, LAYOUT, codebook_fingerprints={"image": FINGERPRINT})
    assert caught.value.reason == "unreadable_file"
    with pytest.raises(ShardError, match=r"c_other_codebook\.parquet: the image codebook fingerprint") as caught:
        ShardSource([mixed_shards[0], mixed_shards[2]], LAYOUT, codebook_fingerprints={"image": FINGERPRINT})
    assert caught.value.reason == "codebook_mismatch"


def test_source_skips_bad_shards(mixed_shards, caplog):
    with caplog.at_level(logging.WARNING, logger="mol_tune.data.source"):
        source = ShardSource(
            mixed_shards, LAYOUT, codebook_fingerprints={"image": FINGERPRINT}, shuffle=False, infinite=False,
            on_error="skip",
        )  # fmt: skip
        ids = [sample["sample_id"] for sample in source]
    assert ids == [0, 1, 2, 3, 4]
    assert source.skipped_shards.counts == {"unreadable_file": 1, "codebook_mismatch": 1}
    assert "b_garbage.parquet" in caplog.text
    assert "c_other_codebook.parquet" in caplog.text


def test_all_shards_skipped_raises(mixed_shards):
    with pytest.raises(ValueError, match=r"gets no rows .*2 shards skipped \(codebook_mismatch: 1, unreadable_file: 1\)"):
        ShardSource(mixed_shards[1:], LAYOUT, codebook_fingerprints={"image": FINGERPRINT}, on_error="skip")


def take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def damage_row_group(path, group):
    """Overwrite the first column chunk of a row group with 0xFF bytes."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    with open(path, "wb") as file:
        file.write(data)


def test_damaged_row_group(tmp_path):
    path = write_rows(tmp_path / "damaged.parquet", [good_row(i) for i in range(20)], row_group_size=10)
    damage_row_group(path, 1)
    with pytest.raises(ShardError, match=r"damaged\.parquet, rows 10 to 19"):
        list(ShardSource(path, LAYOUT, shuffle=False, infinite=False))
    source = ShardSource(path, LAYOUT, shuffle=False, infinite=False, on_error="skip")
    assert [sample["sample_id"] for sample in source] == list(range(10))
    assert source.skipped_rows.counts == {"unreadable_file": 10}
    reader = ShardReader(path, on_error="skip")
    assert reader[9]["sample_id"] == 9
    with pytest.raises(ShardError, match="rows 10 to 19"):
        reader[15]


def test_error_in_source_thread_names_row(bad_rows_shard):
    """A bad row found while a ParallelMapper's thread reads the source reaches the caller with file and row."""
    path, _, _ = bad_rows_shard
    source = ShardSource(path, LAYOUT, shuffle=False, infinite=False)
    node = ParallelMapper(source, SampleBuilder(LAYOUT), num_workers=2, method="thread", in_order=True)
    with pytest.raises(ShardError, match=r"bad\.parquet, row 1: the sample is empty"):
        list(Loader(node))


def test_error_in_worker_thread_names_row(tmp_path):
    """A code that fits the shard's codebook but not the model's is found by SampleBuilder in a worker thread."""
    rows = [good_row(i) for i in range(6)]
    rows[4]["segments"][1]["tokens"] = [7]
    path = write_rows(tmp_path / "wide.parquet", rows)
    small = VocabularyLayout(50, ({"name": "image", "num_codes": 6, "codebook_dim": 4},))
    # No layout for the source, so the row passes it and only the map function sees the bad code.
    node = ParallelMapper(ShardSource(path, shuffle=False, infinite=False), SampleBuilder(small), num_workers=2, method="thread")
    with pytest.raises(ShardError, match=r"Invalid sample in shard .*wide\.parquet, row 4: segment 1 \(image\).*code 7"):
        list(Loader(node))


def test_writer_error_carries_reason(tmp_path):
    with pytest.raises(ShardError) as caught:
        with ShardWriter(str(tmp_path / "w.parquet"), INFO) as writer:
            writer.write(0, [("image", [9])])
    assert caught.value.reason == "code_out_of_range"
    assert not os.path.exists(tmp_path / "w.parquet")


# The skip policy through the loaders, the token count of the mixture and the data config.


def row_skips(counts):
    return {f"rows/{reason}": count for reason, count in counts.items()}


def test_loader_skips_and_counts(bad_rows_shard, mixed_shards):
    bad_path, good, counts = bad_rows_shard
    paths = [mixed_shards[0], mixed_shards[1], bad_path]
    loader = build_dataloader(
        paths, LAYOUT, seq_len=16, batch_size=1, shuffle=False, infinite=False, on_error="skip",
        codebook_fingerprints={"image": FINGERPRINT},
    )  # fmt: skip
    batches = list(loader)
    ids = [i for batch in batches for row in batch["sample_ids"] for i in row]
    assert ids == [0, 1, 2, 3, 4] + good
    assert batches[0]["skipped"] == {"shards/unreadable_file": 1}
    assert batches[-1]["skipped"] == {"shards/unreadable_file": 1, **row_skips(counts)}
    for before, after in zip(batches, batches[1:]):
        assert all(after["skipped"].get(key, 0) >= count for key, count in before["skipped"].items())


def test_loader_raises_by_default(mixed_shards):
    with pytest.raises(ShardError, match=r"b_garbage\.parquet"):
        build_dataloader(mixed_shards[:2], LAYOUT, seq_len=16)


def test_skip_counts_in_batches_survive_resume(bad_rows_shard):
    path, _, _ = bad_rows_shard
    kwargs = dict(seq_len=12, batch_size=1, seed=1, on_error="skip")
    # 4 good rows an epoch, two to a sequence, so 9 batches read 4.5 epochs of bad rows.
    reference = take(build_dataloader(path, LAYOUT, **kwargs), 9)
    first = build_dataloader(path, LAYOUT, **kwargs)
    head = take(first, 4)
    resumed = build_dataloader(path, LAYOUT, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = take(resumed, 5)
    assert [b["skipped"] for b in head + tail] == [b["skipped"] for b in reference]
    assert sum(reference[-1]["skipped"].values()) >= 4 * 4


def test_resume_at_end_of_pass(bad_rows_shard):
    path, good, _ = bad_rows_shard
    source = ShardSource(path, LAYOUT, shuffle=False, infinite=False, on_error="skip")
    assert [next(source)["sample_id"] for _ in good] == good
    resumed = ShardSource(path, LAYOUT, shuffle=False, infinite=False, on_error="skip")
    resumed.reset(json.loads(json.dumps(source.state_dict())))
    assert list(resumed) == []


def test_mixture_count_raises_naming_file(mixed_shards):
    with pytest.raises(ShardError, match=r"b_garbage\.parquet") as caught:
        build_mixture_dataloader({"toy": mixed_shards[:2]}, LAYOUT, seq_len=16)
    assert caught.value.reason == "unreadable_file"


def test_mixture_count_skips_bad_shards(mixed_shards):
    loader, plan = build_mixture_dataloader(
        {"toy": mixed_shards}, LAYOUT, seq_len=12, codebook_fingerprints={"image": FINGERPRINT}, on_error="skip"
    )
    profile = plan.profiles[0]
    assert profile.num_samples == 5
    assert profile.skipped == {"shards/unreadable_file": 1, "shards/codebook_mismatch": 1}
    assert "skipped as invalid" in plan.describe()[0]
    batches = take(loader, 4)
    assert {i for batch in batches for row in batch["sample_ids"] for i in row} <= {0, 1, 2, 3, 4}
    assert batches[-1]["skipped"] == {"shards/unreadable_file": 1, "shards/codebook_mismatch": 1}


def test_mixture_count_damaged_row_group(tmp_path):
    path = write_rows(tmp_path / "damaged.parquet", [good_row(i) for i in range(20)], row_group_size=10)
    damage_row_group(path, 1)
    with pytest.raises(ShardError, match=r"damaged\.parquet, rows 10 to 19"):
        measure_dataset_profile("toy", path, LAYOUT)
    profile = measure_dataset_profile("toy", path, LAYOUT, on_error="skip")
    assert profile.num_samples == 10
    assert profile.skipped == {"rows/unreadable_file": 10}


def test_mixture_count_unknown_modality_row(bad_rows_shard):
    path, _, _ = bad_rows_shard
    with pytest.raises(ShardError, match=r"bad\.parquet, row 4: it has modality 'smell'") as caught:
        measure_dataset_profile("toy", path, LAYOUT)
    assert caught.value.reason == "unknown_modality"
    profile = measure_dataset_profile("toy", path, LAYOUT, on_error="skip")
    # Row 1 is empty, so it counts as excluded, not as skipped. Rows 3 and 6 are bad only in their values.
    assert (profile.num_samples, profile.num_excluded) == (6, 1)
    assert profile.skipped == {"rows/unknown_modality": 1}


def test_data_config_passes_on_error(bad_rows_shard, mixed_shards):
    bad_path, good, counts = bad_rows_shard
    section = {
        "datasets": [{"name": "toy", "train": [mixed_shards[0], mixed_shards[1], bad_path], "validation": [bad_path]}],
        "seq_len": 12,
        "batch_size": 2,
    }
    with pytest.raises(ShardError, match=r"b_garbage\.parquet"):
        build_training_loader(section, LAYOUT)

    section["on_error"] = "skip"
    loader, plan = build_training_loader(section, LAYOUT)
    assert plan.profiles[0].skipped == {"shards/unreadable_file": 1, "rows/unknown_modality": 1}
    assert take(loader, 3)[-1]["skipped"]["shards/unreadable_file"] == 1

    batches = list(build_validation_loaders(section, LAYOUT)["toy"])
    assert [i for batch in batches for row in batch["sample_ids"] for i in row] == good
    assert batches[-1]["skipped"] == row_skips(counts)


def test_data_config_rejects_unknown_policy(bad_rows_shard):
    section = {"train": bad_rows_shard[0], "seq_len": 12, "batch_size": 2, "on_error": "ignore"}
    with pytest.raises(ValueError, match=r"Invalid data.on_error: 'ignore'"):
        build_training_loader(section, LAYOUT)


@pytest.mark.parametrize("infinite", [False, True])
def test_all_rows_skipped_raises(tmp_path, infinite):
    rows = [good_row(i) for i in range(4)]
    for row in rows:
        row["segments"][1]["tokens"] = [9]
    path = write_rows(tmp_path / "all_bad.parquet", rows)
    loader = build_dataloader(path, LAYOUT, seq_len=12, infinite=infinite, on_error="skip")
    with pytest.raises(ValueError, match=r"Every row that rank 0 of 1 read from .*all_bad\.parquet.* was skipped"):
        take(loader, 1)
