"""Tests of `mol-tune make-shards` on real data: digit images written as PNG/NPY files, FSDD spoken digits, text.

Every expected value is computed here without the converter: codes by a plain nearest-code loop
or the fixture tokenizer on waveforms read with scipy, text ids with the `tokenizers` library.
"""

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from scipy.io import wavfile
from sklearn.datasets import load_digits
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from media_tokenizers import FrameKMeansTokenizer
from mol_tune import cli
from mol_tune.data.conversion_state import STATE_FILE
from mol_tune.data.convert import ConvertConfig, main, make_shards, parse_config
from mol_tune.data.digits import DIGIT_NAMES, caption_digits
from mol_tune.data.image_vq import PatchVQTokenizer
from mol_tune.data.media import read_image, read_wav
from mol_tune.data.shards import ShardReader, read_shard_info

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FSDD_DIR = "/work/shared/data/fsdd/recordings"
NUM_IMAGES = 40
NUM_NPY = 10  # the last NUM_NPY images are written as .npy, the others as PNG
IMAGE_CODES = 32


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer trained on digit captions and number words."""
    corpus = caption_digits(np.arange(100) % 10, seed=1) + list(DIGIT_NAMES)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    directory = tmp_path_factory.mktemp("text-tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)


def text_ids(tokenizer_dir, text):
    return Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target


@pytest.fixture(scope="module")
def image_tokenizer_dir(digits, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("image-tokenizer"))
    PatchVQTokenizer(num_codes=IMAGE_CODES, patch_size=2, image_size=8).fit(digits[0][:600]).save(directory)
    return directory


@pytest.fixture(scope="module")
def image_folder(digits, tmp_path_factory):
    """Write the first NUM_IMAGES digits as PNG and NPY files with a CSV manifest.

    Returns:
        (manifest path, pixels as the files store them [n, 8, 8], captions)
    """
    images, labels = digits
    root = tmp_path_factory.mktemp("digit-images")
    (root / "images").mkdir()
    captions = caption_digits(labels[:NUM_IMAGES], seed=0)
    stored = []
    with open(root / "manifest.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        for i in range(NUM_IMAGES):
            if i < NUM_IMAGES - NUM_NPY:
                pixels = np.round(images[i] * 255).astype(np.uint8)
                name = f"images/{i:04d}.png"
                Image.fromarray(pixels).save(root / name)
                stored.append(pixels.astype(np.float32) / np.float32(255))
            else:
                name = f"images/{i:04d}.npy"
                np.save(root / name, images[i])
                stored.append(images[i])
            writer.writerow([name, captions[i]])
    return str(root / "manifest.csv"), np.stack(stored), captions


def nearest_codes(pixels, codebook):
    """Codes of one 8x8 image by a plain loop over 2x2 patches in row-major order."""
    codes = []
    for row in range(0, 8, 2):
        for col in range(0, 8, 2):
            patch = pixels[row : row + 2, col : col + 2].reshape(-1)
            distances = [float(((patch - vector) ** 2).sum()) for vector in codebook]
            codes.append(int(np.argmin(distances)))
    return codes


def read_rows(output_dir):
    """Return {sample_id: [(modality, tokens)]} over all shards of a folder, and the shard files."""
    files = sorted(glob.glob(os.path.join(output_dir, "*.parquet")))
    rows = {}
    for path in files:
        for sample in ShardReader(path):
            rows[sample["sample_id"]] = [(s["modality"], s["tokens"]) for s in sample["segments"]]
    return rows, files


def image_args(manifest, tokenizer_dir, image_tokenizer_dir, output_dir, *extra):
    return [
        "--modality", "image", "--input", manifest, "--tokenizer-dir", tokenizer_dir,
        "--image-tokenizer", image_tokenizer_dir, "--dataset", "digits_files", "--output-dir", str(output_dir),
        "--samples-per-shard", "16", *extra,
    ]  # fmt: skip


def test_image_shards_match_reference(image_folder, tokenizer_dir, image_tokenizer_dir, tmp_path):
    manifest, pixels, captions = image_folder
    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, tmp_path))
    rows, files = read_rows(tmp_path)
    codebook = PatchVQTokenizer.load(image_tokenizer_dir).codebook.numpy()

    assert [os.path.basename(f) for f in files] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [len(ShardReader(f)) for f in files] == [16, 16, 8]
    assert sorted(rows) == list(range(NUM_IMAGES))
    for i in range(NUM_IMAGES):
        assert rows[i] == [("text", text_ids(tokenizer_dir, captions[i])), ("image", nearest_codes(pixels[i], codebook))]


def test_image_shard_metadata(image_folder, tokenizer_dir, image_tokenizer_dir, tmp_path):
    manifest, _, _ = image_folder
    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, tmp_path))
    info = read_shard_info(str(tmp_path / "shard-00000.parquet"))
    tokenizer = PatchVQTokenizer.load(image_tokenizer_dir)
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as file:
        import hashlib

        tokenizer_sha256 = hashlib.sha256(file.read()).hexdigest()
    assert info.dataset == "digits_files"
    assert info.text_tokenizer == os.path.basename(tokenizer_dir)
    assert info.text_tokenizer_sha256 == tokenizer_sha256
    assert set(info.modalities) == {"image"}
    assert info.modalities["image"].num_codes == IMAGE_CODES
    assert info.modalities["image"].codebook_dim == 4
    assert info.modalities["image"].codebook_fingerprint == tokenizer.fingerprint


def test_worker_threads_same_shards(image_folder, tokenizer_dir, image_tokenizer_dir, tmp_path):
    manifest, _, _ = image_folder
    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, tmp_path / "serial"))
    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, tmp_path / "threads", "--num-workers", "3"))
    serial, _ = read_rows(tmp_path / "serial")
    threaded, _ = read_rows(tmp_path / "threads")
    assert threaded == serial


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    """Fit the fixture speech tokenizer on 10 FSDD takes and write a JSONL manifest of 30 others."""
    if not os.path.isdir(FSDD_DIR):
        pytest.skip(f"FSDD recordings not found in {FSDD_DIR}")
    directory = tmp_path_factory.mktemp("speech")
    fit_files = [os.path.join(FSDD_DIR, f"{digit}_spk1_5.wav") for digit in range(10)]
    tokenizer = FrameKMeansTokenizer.fit([wavfile.read(f)[1].astype(np.float32) / 32768 for f in fit_files])
    codebook_path = str(directory / "codebook.npy")
    np.save(codebook_path, tokenizer.codebook.numpy())
    names = [f"{digit}_spk{speaker}_{take}.wav" for digit in range(10) for speaker in (2, 3) for take in (0, 1)][:30]
    with open(directory / "manifest.jsonl", "w") as file:
        for name in names:
            file.write(json.dumps({"audio": name, "transcript": DIGIT_NAMES[int(name[0])]}) + "\n")
    return str(directory / "manifest.jsonl"), codebook_path, names, tokenizer


def test_speech_shards_match_reference(speech_data, tokenizer_dir, tmp_path):
    manifest, codebook_path, names, tokenizer = speech_data
    main([
        "--modality", "speech", "--input", manifest, "--root", FSDD_DIR, "--tokenizer-dir", tokenizer_dir,
        "--speech-tokenizer", "media_tokenizers.load_frame_tokenizer", "--tokenizer-arg", f"path={codebook_path}",
        "--dataset", "fsdd", "--output-dir", str(tmp_path), "--samples-per-shard", "12",
    ])  # fmt: skip
    rows, files = read_rows(tmp_path)
    assert len(files) == 3
    assert sorted(rows) == list(range(len(names)))
    for i, name in enumerate(names):
        rate, samples = wavfile.read(os.path.join(FSDD_DIR, name))
        expected_codes = tokenizer.encode(samples.astype(np.float32) / 32768, rate).tolist()
        transcript = DIGIT_NAMES[int(name[0])]
        assert rows[i] == [("text", text_ids(tokenizer_dir, transcript)), ("speech", expected_codes)]
    info = read_shard_info(files[0])
    assert info.modalities["speech"].codebook_fingerprint == tokenizer.fingerprint
    assert info.modalities["speech"].num_codes == 16


def test_text_lines_paragraphs_jsonl(tokenizer_dir, tmp_path):
    lines = ["a handwritten digit one", "", "the number two", "", "", "seven, drawn by hand", "eight"]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["five", "six six"]))
    base = ["--modality", "text", "--tokenizer-dir", tokenizer_dir, "--dataset", "text"]
    main(base + ["--input", str(tmp_path / "corpus.txt"), "--output-dir", str(tmp_path / "lines")])
    main(base + ["--input", str(tmp_path / "corpus.txt"), "--output-dir", str(tmp_path / "paras"), "--text-unit", "paragraph"])
    main(base + ["--input", str(tmp_path / "corpus.jsonl"), "--output-dir", str(tmp_path / "jsonl")])

    expected_lines = [line for line in lines if line]
    expected_paragraphs = ["a handwritten digit one", "the number two", "seven, drawn by hand\neight"]
    for folder, texts in (("lines", expected_lines), ("paras", expected_paragraphs), ("jsonl", ["five", "six six"])):
        rows, _ = read_rows(tmp_path / folder)
        assert rows == {i: [("text", text_ids(tokenizer_dir, t))] for i, t in enumerate(texts)}, folder
        assert read_shard_info(str(tmp_path / folder / "shard-00000.parquet")).modalities == {}


def test_cli_subcommand_runs(tokenizer_dir, tmp_path):
    (tmp_path / "corpus.txt").write_text("one\ntwo\n")
    cli.main([
        "make-shards", "--modality", "text", "--input", str(tmp_path / "corpus.txt"), "--tokenizer-dir", tokenizer_dir,
        "--dataset", "tiny", "--output-dir", str(tmp_path / "out"),
    ])  # fmt: skip
    rows, _ = read_rows(tmp_path / "out")
    assert rows == {0: [("text", text_ids(tokenizer_dir, "one"))], 1: [("text", text_ids(tokenizer_dir, "two"))]}


def test_yaml_config_and_override(tmp_path):
    config = {
        "modality": "speech",
        "input": "speech.jsonl",
        "output_dir": "out",
        "dataset": "fsdd",
        "samples_per_shard": 100,
        "on_error": "skip",
        "speech_tokenizer": {"_component_": "media_tokenizers.load_frame_tokenizer", "path": "a.npy"},
    }
    (tmp_path / "convert.yaml").write_text(yaml.safe_dump(config))
    parsed = parse_config(["--config", str(tmp_path / "convert.yaml"), "--samples-per-shard", "7", "--tokenizer-arg", "path=b.npy"])
    assert parsed.samples_per_shard == 7
    assert parsed.on_error == "skip"
    assert parsed.tokenizer_spec == {"_component_": "media_tokenizers.load_frame_tokenizer", "path": "b.npy"}
    assert parsed.root == os.path.dirname(os.path.abspath("speech.jsonl"))


def test_wav_reader_matches_scipy(tmp_path):
    import wave

    rng = np.random.default_rng(0)
    cases = {
        "u8_mono.wav": (1, 1, rng.integers(0, 256, 300, dtype=np.uint8)),
        "s16_stereo.wav": (2, 2, rng.integers(-32768, 32768, (300, 2)).astype("<i2")),
        "s24_mono.wav": (1, 3, rng.integers(-(1 << 23), 1 << 23, 300).astype(np.int32)),
    }
    for name, (channels, width, data) in cases.items():
        if width == 3:
            raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in data)
        else:
            raw = data.tobytes()
        with wave.open(str(tmp_path / name), "wb") as file:
            file.setnchannels(channels)
            file.setsampwidth(width)
            file.setframerate(16000)
            file.writeframes(raw)

        rate, reference = wavfile.read(str(tmp_path / name))
        if width == 1:
            reference = (reference.astype(np.float64) - 128) / 128
        elif width == 2:
            reference = reference.astype(np.float64) / 32768
        else:
            reference = reference.astype(np.float64) / 2**31  # scipy left-justifies 24-bit samples in int32
        if reference.ndim == 2:
            reference = reference.mean(axis=1)
        samples, sample_rate = read_wav(str(tmp_path / name))
        assert sample_rate == rate == 16000, name
        assert samples.dtype == np.float32, name
        np.testing.assert_allclose(samples, reference, atol=1e-6, err_msg=name)


def test_image_reader_modes_and_scaling(tmp_path):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (6, 5), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(read_image(str(tmp_path / "deep.png")), deep / 65535.0, atol=1e-6)

    colour = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "colour.png"), mode="RGB"), colour / np.float32(255))
    wide = colour.astype(np.int64)
    luma = (wide[..., 0] * 299 + wide[..., 1] * 587 + wide[..., 2] * 114) / 1000 / 255
    np.testing.assert_allclose(read_image(str(tmp_path / "colour.png")), luma, atol=1.01 / 255)

    np.save(tmp_path / "flat.npy", np.full((16, 12), 0.25, dtype=np.float32))
    resized = read_image(str(tmp_path / "flat.npy"), size=8)
    assert resized.shape == (8, 8)
    np.testing.assert_allclose(resized, 0.25, atol=1e-6)


def test_resume_after_kill_matches_full_run(image_folder, tokenizer_dir, image_tokenizer_dir, tmp_path):
    """SIGKILL the converter in the middle of shard 2, then rerun: the result equals an uninterrupted run."""
    manifest, _, _ = image_folder
    killed_dir = tmp_path / "killed"
    spec = {"_component_": "media_tokenizers.KillingImageTokenizer", "directory": image_tokenizer_dir, "kill_at": 37}
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump({"image_tokenizer": spec}))
    args = image_args(manifest, tokenizer_dir, image_tokenizer_dir, killed_dir, "--config", str(tmp_path / "kill.yaml"))
    args.remove("--image-tokenizer")
    args.remove(image_tokenizer_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    process = subprocess.run(
        [sys.executable, "-m", "mol_tune.data.convert", *args], env=env, capture_output=True, text=True, timeout=120
    )

    assert process.returncode == -9, process.stderr
    assert sorted(os.listdir(killed_dir)) == [
        STATE_FILE,
        "shard-00000.parquet",
        "shard-00001.parquet",
        f"shard-00002.parquet.tmp-{process_pid(killed_dir)}",
    ]
    with open(killed_dir / STATE_FILE) as file:
        assert [record["file"] for record in json.load(file)["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    first_shard_mtime = os.stat(killed_dir / "shard-00000.parquet").st_mtime_ns

    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, killed_dir))
    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, tmp_path / "full"))
    assert sorted(os.listdir(killed_dir)) == sorted(os.listdir(tmp_path / "full"))
    assert os.stat(killed_dir / "shard-00000.parquet").st_mtime_ns == first_shard_mtime
    for name in ("shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"):
        assert pq.read_table(killed_dir / name).equals(pq.read_table(tmp_path / "full" / name)), name


def process_pid(folder):
    """Return the process id in the name of the one unfinished shard file in ``folder``."""
    (name,) = [n for n in os.listdir(folder) if ".tmp-" in n]
    return name.rsplit("-", 1)[1]


def test_rerun_when_complete_rewrites_nothing(image_folder, tokenizer_dir, image_tokenizer_dir, tmp_path, capsys):
    manifest, _, _ = image_folder
    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, tmp_path))
    mtimes = {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)}
    capsys.readouterr()
    main(image_args(manifest, tokenizer_dir, image_tokenizer_dir, tmp_path))
    assert "up to date" in capsys.readouterr().out
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)} == mtimes


def test_shorter_input_removes_stale_shards(tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{DIGIT_NAMES[i % 10]}\n" for i in range(25)))
    config = dict(modality="text", input=str(corpus), output_dir=str(tmp_path / "out"), dataset="t",
                  tokenizer_dir=tokenizer_dir, samples_per_shard=10)  # fmt: skip
    make_shards(ConvertConfig(**config))
    assert len(glob.glob(str(tmp_path / "out" / "*.parquet"))) == 3
    corpus.write_text("".join(f"{DIGIT_NAMES[i % 10]}\n" for i in range(12)))
    summary = make_shards(ConvertConfig(**config))
    rows, files = read_rows(tmp_path / "out")
    assert len(files) == 2
    assert sorted(rows) == list(range(12))
    assert summary["num_samples"] == 12
