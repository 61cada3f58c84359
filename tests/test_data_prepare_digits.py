"""End-to-end test of the digits preparation and of the loader on the real digits."""

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from sklearn.datasets import load_digits
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from mol_tune.data.digits import CAPTION_TEMPLATES, DIGIT_NAMES
from mol_tune.data.image_vq import PatchVQTokenizer
from mol_tune.data.pipeline import build_dataloader
from mol_tune.data.prepare_digits import main, prepare_digits
from mol_tune.data.shards import ShardReader
from mol_tune.vocab import VocabularyLayout

BOS, EOS = 1, 2


def caption_words():
    words = set()
    for template in CAPTION_TEMPLATES:
        for name in DIGIT_NAMES:
            words.update(template.format(name=name).replace(",", " , ").split())
    return sorted(words)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer whose post-processor adds BOS and EOS, as many chat tokenizers do."""
    vocab = {"<unk>": 0, "<bos>": BOS, "<eos>": EOS}
    for word in caption_words():
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    directory = tmp_path_factory.mktemp("toy-tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def prepared(tokenizer_dir, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("digits"))
    summary = prepare_digits(tokenizer_dir, output_dir, seed=0, num_codes=64)
    return output_dir, summary


def layout_for(tokenizer_dir, num_codes):
    size = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
    return VocabularyLayout(size, ({"name": "image", "num_codes": num_codes, "codebook_dim": 4},))


def test_outputs_exist(prepared):
    output_dir, _ = prepared
    for name in ("train.parquet", "validation.parquet", "dataset.json", "image_tokenizer/config.json"):
        assert os.path.isfile(os.path.join(output_dir, name)), name


def test_split_sizes(prepared):
    _, summary = prepared
    train, validation = summary["splits"]["train"], summary["splits"]["validation"]
    assert train["num_samples"] + validation["num_samples"] == len(load_digits().target)
    assert abs(validation["num_samples"] - 180) <= 1
    assert train["num_image_codes"] == 16 * train["num_samples"]


def test_fingerprint_is_codebook_sha256(prepared):
    output_dir, summary = prepared
    codebook = load_file(os.path.join(output_dir, "image_tokenizer", "codebook.safetensors"))["codebook"]
    expected = hashlib.sha256(codebook.astype("<f4").tobytes()).hexdigest()
    assert summary["modalities"]["image"]["codebook_fingerprint"] == expected
    for split in ("train", "validation"):
        metadata = pq.read_schema(os.path.join(output_dir, f"{split}.parquet")).metadata
        modalities = json.loads(metadata[b"mol_tune.modalities"])
        assert modalities["image"]["codebook_fingerprint"] == expected
        assert modalities["image"]["num_codes"] == 64


def test_samples_hold_caption_then_image(prepared, tokenizer_dir):
    output_dir, _ = prepared
    text_tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    image_tokenizer = PatchVQTokenizer.load(os.path.join(output_dir, "image_tokenizer"))
    digits = load_digits()
    reader = ShardReader(os.path.join(output_dir, "validation.parquet"))
    for sample in reader:
        (text_modality, text), (image_modality, codes) = [(s["modality"], s["tokens"]) for s in sample["segments"]]
        assert (text_modality, image_modality) == ("text", "image")
        assert BOS not in text
        assert EOS not in text
        words = text_tokenizer.decode(text).split()
        assert DIGIT_NAMES[digits.target[sample["sample_id"]]] in words
        image = digits.images[sample["sample_id"]][None] / 16.0
        assert codes == image_tokenizer.encode(image)[0].tolist()


def test_second_run_does_nothing(prepared, tokenizer_dir, capsys):
    output_dir, summary = prepared
    files = ["train.parquet", "validation.parquet", "dataset.json", "image_tokenizer/codebook.safetensors"]
    before = {name: os.stat(os.path.join(output_dir, name)).st_mtime_ns for name in files}
    again = prepare_digits(tokenizer_dir, output_dir, seed=0, num_codes=64)
    after = {name: os.stat(os.path.join(output_dir, name)).st_mtime_ns for name in files}
    assert again == summary
    assert after == before
    assert "up to date" in capsys.readouterr().out


def test_changed_settings_rebuild(tokenizer_dir, tmp_path):
    output_dir = str(tmp_path)
    main(["--tokenizer-dir", tokenizer_dir, "--output-dir", output_dir, "--num-codes", "32"])
    with open(os.path.join(output_dir, "dataset.json")) as file:
        assert json.load(file)["modalities"]["image"]["num_codes"] == 32
    main(["--tokenizer-dir", tokenizer_dir, "--output-dir", output_dir, "--num-codes", "48"])
    with open(os.path.join(output_dir, "dataset.json")) as file:
        assert json.load(file)["modalities"]["image"]["num_codes"] == 48
    assert PatchVQTokenizer.load(os.path.join(output_dir, "image_tokenizer")).num_codes == 48


def test_missing_shard_rebuilds(tokenizer_dir, tmp_path):
    output_dir = str(tmp_path)
    first = prepare_digits(tokenizer_dir, output_dir, num_codes=32)
    os.remove(os.path.join(output_dir, "validation.parquet"))
    second = prepare_digits(tokenizer_dir, output_dir, num_codes=32)
    assert os.path.isfile(os.path.join(output_dir, "validation.parquet"))
    assert len(ShardReader(os.path.join(output_dir, "validation.parquet"))) == first["splits"]["validation"]["num_samples"]
    assert second["splits"] == first["splits"]


def test_missing_tokenizer_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        prepare_digits(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_loader_on_real_digits(prepared, tokenizer_dir):
    output_dir, summary = prepared
    layout = layout_for(tokenizer_dir, num_codes=64)
    fingerprints = {"image": summary["modalities"]["image"]["codebook_fingerprint"]}
    loader = build_dataloader(
        os.path.join(output_dir, "train.parquet"), layout, seq_len=128, batch_size=4,
        bos_id=BOS, eos_id=EOS, codebook_fingerprints=fingerprints,
    )
    open_id, close_id = layout.delimiter_ids("image")
    code_start, code_end = layout.code_range("image")
    orders = set()
    for batch_index, batch in enumerate(loader):
        for row in range(batch["tokens"].shape[0]):
            tokens = batch["tokens"][row].tolist()
            documents = batch["document_ids"][row].tolist()
            for document in range(max(documents)):
                sample = [t for t, d in zip(tokens, documents) if d == document]
                assert sample[0] == BOS
                assert sample[-1] == EOS
                start, end = sample.index(open_id), sample.index(close_id)
                codes = sample[start + 1 : end]
                assert len(codes) == 16
                assert all(code_start <= c < code_end for c in codes)
                other = sample[1:start] + sample[end + 1 : -1]
                assert all(t < layout.base_vocab_size for t in other)
                orders.add("image first" if start == 1 else "text first")
        if batch_index == 4:
            break
    assert orders == {"image first", "text first"}
