"""MoL checkpoints: save the trained state, rebuild the model from the folder, same logits."""

import json

import pytest
import torch
from safetensors import safe_open
from torchtune.training import set_default_dtype
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mol_tune.checkpointing import mol_checkpoint
from mol_tune.checkpointing.base import load_base_state_dict
from mol_tune.checkpointing.mol_checkpoint import load_mol_model, load_mol_state, save_mol_checkpoint
from mol_tune.models import mol_llama3_2, mol_qwen2
from mol_tune.models._model_builders import records_build_config

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN = 128, 64, 2, 4, 2, 96
MODALITIES = [
    {"name": "image", "num_codes": 16, "codebook_dim": 8},
    {"name": "speech", "num_codes": 8, "codebook_dim": 4},
]
LLAMA_ARGS = dict(
    vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
    max_seq_len=64, intermediate_dim=FFN, rope_base=100_000, scale_factor=1, norm_eps=1e-5,
)
QWEN2_ARGS = dict(
    vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
    intermediate_dim=FFN, max_seq_len=64, rope_base=1_000_000.0, norm_eps=1e-6,
)


def _save_hf_base(model_class, config, folder):
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    return folder


@pytest.fixture
def llama_base(tmp_path):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rope_theta=100_000.0, rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    return _save_hf_base(LlamaForCausalLM, config, tmp_path / "llama_base")


@pytest.fixture
def qwen2_base(tmp_path):
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    return _save_hf_base(Qwen2ForCausalLM, config, tmp_path / "qwen2_base")


def _trained_model(component_builder, builder_args, base_dir, model_type, seed=1, **mol_kwargs):
    """Build a tiny MoL model on the saved base weights and give every MoL tensor random values."""
    model = records_build_config(component_builder)(
        **builder_args, modalities=MODALITIES, lora_rank=4, lora_alpha=8.0, **mol_kwargs
    )
    model.load_base_state_dict(load_base_state_dict(base_dir, model_type))
    generator = torch.Generator().manual_seed(seed)
    for modality in MODALITIES:
        codebook = torch.randn(modality["num_codes"], modality["codebook_dim"], generator=generator)
        model.tok_embeddings.set_codebook(modality["name"], codebook)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.add_(0.1 * noise.to(parameter.dtype))
    return model.eval()


def _mixed_tokens(model):
    """Tokens from every range of the layout: text, each modality's codes, the delimiters."""
    layout = model.layout
    image_open, image_close = layout.delimiter_ids("image")
    image_start, image_end = layout.code_range("image")
    speech_open, speech_close = layout.delimiter_ids("speech")
    speech_start, speech_end = layout.code_range("speech")
    row = (
        [1, 5, 77, image_open]
        + list(range(image_start, image_end, 3))
        + [image_close, 9, speech_open]
        + list(range(speech_start, speech_end, 2))
        + [speech_close, VOCAB - 1]
    )
    return torch.tensor([row, row[::-1]])


def _logits(model):
    with torch.no_grad():
        return model(_mixed_tokens(model))


def _saved_keys(checkpoint_dir):
    with safe_open(str(checkpoint_dir / "adapter_model.safetensors"), framework="pt") as weights:
        return set(weights.keys())


def test_reload_llama_logits_equal(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "step_1", step=1, base_checkpoint_dir=llama_base)
    reloaded = load_mol_model(checkpoint).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    assert reloaded.build_config == model.build_config


def test_reload_qwen2_logits_equal(tmp_path, qwen2_base):
    model = _trained_model(mol_qwen2, QWEN2_ARGS, qwen2_base, "QWEN2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=qwen2_base)
    config = json.loads((checkpoint / "mol_config.json").read_text())
    assert config["base_model_type"] == "QWEN2"
    reloaded = load_mol_model(checkpoint).eval()
    assert torch.equal(_logits(reloaded), _logits(model))


def test_reload_shared_adapter_equal(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2", adapter_mode="shared")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    assert "layers.0.attn.q_proj.lora_a.shared.weight" in _saved_keys(checkpoint)
    reloaded = load_mol_model(checkpoint).eval()
    assert torch.equal(_logits(reloaded), _logits(model))


def test_reload_bfloat16_equal(tmp_path, llama_base):
    with set_default_dtype(torch.bfloat16):
        model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    reloaded = load_mol_model(checkpoint).eval()
    assert reloaded.tok_embeddings.new_weight.dtype == torch.bfloat16
    assert torch.equal(_logits(reloaded), _logits(model))


def test_saved_keys_exclude_base(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    expected = {
        key
        for key in model.state_dict()
        if ".lora_a." in key or ".lora_b." in key or ".scales." in key or key.startswith("tok_embeddings.")
    }
    saved = _saved_keys(checkpoint)
    assert saved == expected
    assert "tok_embeddings.text_weight" in saved
    assert "tok_embeddings.codebooks.image" in saved
    assert "layers.0.attn.q_proj.weight" not in saved
    assert "norm.scale" not in saved


def test_frozen_text_rows_not_saved(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2", embedding_training="new")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    saved = _saved_keys(checkpoint)
    assert "tok_embeddings.text_weight" not in saved
    assert "tok_embeddings.new_weight" in saved
    reloaded = load_mol_model(checkpoint).eval()
    assert torch.equal(_logits(reloaded), _logits(model))


def test_config_records_model(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(
        model, tmp_path / "ckpt", step=7, extra={"note": "first run"}, base_checkpoint_dir=llama_base
    )
    config = json.loads((checkpoint / "mol_config.json").read_text())
    assert config["build_config"] == model.build_config
    assert config["layout"] == model.layout.to_dict()
    assert config["base_checkpoint_dir"] == str(llama_base.resolve())
    assert config["base_model_type"] == "LLAMA3_2"
    assert config["step"] == 7
    assert config["extra"] == {"note": "first run"}
    assert set(config["saved_keys"]) == _saved_keys(checkpoint)


def test_base_from_extra(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    extra = {"base_checkpoint_dir": str(llama_base), "base_model_type": "LLAMA3_2"}
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", extra=extra)
    config = json.loads((checkpoint / "mol_config.json").read_text())
    assert config["base_checkpoint_dir"] == str(llama_base.resolve())
    assert torch.equal(_logits(load_mol_model(checkpoint).eval()), _logits(model))


def test_base_dir_override(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    moved = llama_base.rename(tmp_path / "moved_base")
    with pytest.raises(FileNotFoundError, match="llama_base"):
        load_mol_model(checkpoint)
    reloaded = load_mol_model(checkpoint, base_checkpoint_dir=moved).eval()
    assert torch.equal(_logits(reloaded), _logits(model))


def test_interrupted_save_keeps_previous(tmp_path, llama_base, monkeypatch):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", step=1, base_checkpoint_dir=llama_base)
    expected = _logits(model)
    files_before = sorted(path.name for path in checkpoint.iterdir())

    def killed_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    with torch.no_grad():
        model.layers[0].attn.q_proj.lora_b["image"].weight.add_(1.0)
    monkeypatch.setattr(mol_checkpoint, "save_file", killed_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_mol_checkpoint(model, checkpoint, step=2, base_checkpoint_dir=llama_base)

    assert sorted(path.name for path in checkpoint.iterdir()) == files_before
    reloaded = load_mol_model(checkpoint).eval()
    assert torch.equal(_logits(reloaded), expected)


def test_mixed_saves_rejected(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    first = save_mol_checkpoint(model, tmp_path / "first", base_checkpoint_dir=llama_base)
    second = save_mol_checkpoint(model, tmp_path / "second", base_checkpoint_dir=llama_base)
    (first / "mol_config.json").write_text((second / "mol_config.json").read_text())
    with pytest.raises(ValueError, match="different saves"):
        load_mol_model(first)


def test_load_unexpected_key(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    text_only = mol_llama3_2(
        **LLAMA_ARGS, modalities=MODALITIES, lora_rank=4, lora_alpha=8.0, adapter_modalities=["text"]
    )
    with pytest.raises(ValueError, match=r"Unexpected key 'layers\.0\.attn\.[a-z]+_proj\.lora_a\.image\.weight'"):
        load_mol_state(text_only, checkpoint)


def test_load_missing_key(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2", adapter_modalities=["text"])
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    with_image = mol_llama3_2(**LLAMA_ARGS, modalities=MODALITIES, lora_rank=4, lora_alpha=8.0)
    with pytest.raises(ValueError, match=r"Missing key 'layers\.0\.attn\.q_proj\.lora_a\.image\.weight'"):
        load_mol_state(with_image, checkpoint)


def test_load_wrong_shape(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    rank_8 = mol_llama3_2(**LLAMA_ARGS, modalities=MODALITIES, lora_rank=8, lora_alpha=8.0)
    with pytest.raises(ValueError, match=r"Invalid shape of 'layers\.0\.attn\.[a-z]+_proj\.lora_a\.image\.weight'.*\(4, 64\), the model expects \(8, 64\)"):
        load_mol_state(rank_8, checkpoint)


def test_load_other_layout(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    image_only = mol_llama3_2(**LLAMA_ARGS, modalities=MODALITIES[:1], lora_rank=4, lora_alpha=8.0)
    with pytest.raises(ValueError, match="vocabulary layout"):
        load_mol_state(image_only, checkpoint)


def test_load_foreign_builder(tmp_path, llama_base):
    model = _trained_model(mol_llama3_2, LLAMA_ARGS, llama_base, "LLAMA3_2")
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=llama_base)
    config_path = checkpoint / "mol_config.json"
    config = json.loads(config_path.read_text())
    config["build_config"]["builder"] = "os.system"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Invalid builder 'os.system'"):
        load_mol_model(checkpoint)


def test_load_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="mol_config.json"):
        load_mol_model(tmp_path / "empty")


def test_save_without_build_config(tmp_path):
    model = mol_llama3_2(**LLAMA_ARGS, modalities=MODALITIES, lora_rank=4, lora_alpha=8.0)
    with pytest.raises(ValueError, match="build_config"):
        save_mol_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_reload_smollm2_logits_equal(tmp_path):
    from mol_tune.checkpointing.convert_gguf import prepare_default_model
    from mol_tune.models import mol_smollm2_135m

    base_dir = prepare_default_model()
    model = mol_smollm2_135m(modalities=MODALITIES, lora_rank=4, lora_alpha=8.0)
    model.load_base_state_dict(load_base_state_dict(base_dir, "LLAMA3_2"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    checkpoint = save_mol_checkpoint(model, tmp_path / "ckpt", base_checkpoint_dir=base_dir)
    reloaded = load_mol_model(checkpoint).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
