"""Base weights loaded through load_base_state_dict give the same logits as transformers' model."""

import pytest
import torch
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.qwen2 import qwen2
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mol_tune.checkpointing.base import load_base_state_dict

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN = 128, 64, 2, 4, 2, 96


def _tokens(seed=0, length=12):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, length), generator=generator)


def _folder_state(folder):
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


def _random_hf_model(model_class, config):
    torch.manual_seed(0)
    model = model_class(config).eval()
    # The default init sets norms to 1 and biases to 0, so random values are needed to catch swapped keys.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture
def tiny_qwen2_dir(tmp_path):
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    model = _random_hf_model(Qwen2ForCausalLM, config)
    folder = tmp_path / "qwen2"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def tiny_llama_dir(tmp_path):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rope_theta=100_000.0, rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    model = _random_hf_model(LlamaForCausalLM, config)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    return folder, model


def test_qwen2_logits_match_transformers(tiny_qwen2_dir):
    folder, reference = tiny_qwen2_dir
    model = qwen2(
        vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
        intermediate_dim=FFN, max_seq_len=64, norm_eps=1e-6, rope_base=1_000_000.0,
        tie_word_embeddings=True,
    ).eval()
    model.load_state_dict(load_base_state_dict(folder, "QWEN2"), strict=True)
    tokens = _tokens()
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = model(tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_llama_logits_match_transformers(tiny_llama_dir):
    folder, reference = tiny_llama_dir
    model = llama3_2(
        vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
        max_seq_len=64, intermediate_dim=FFN, rope_base=100_000, scale_factor=1, norm_eps=1e-5,
    ).eval()
    model.load_state_dict(load_base_state_dict(folder, "LLAMA3_2"), strict=True)
    tokens = _tokens(seed=1)
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = model(tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_load_leaves_folder_untouched(tiny_llama_dir):
    folder, _ = tiny_llama_dir
    before = _folder_state(folder)
    load_base_state_dict(folder, "llama3_2")
    assert _folder_state(folder) == before


def test_load_missing_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="mol-tune prepare-model") as error:
        load_base_state_dict(missing, "LLAMA3_2")
    assert str(missing) in str(error.value)


def test_load_folder_without_weights(tiny_llama_dir):
    folder, _ = tiny_llama_dir
    for path in folder.glob("*.safetensors"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"No \*\.safetensors") as error:
        load_base_state_dict(folder, "LLAMA3_2")
    assert str(folder) in str(error.value)


def test_load_folder_without_config(tiny_llama_dir):
    folder, _ = tiny_llama_dir
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base_state_dict(folder, "LLAMA3_2")


def test_load_unknown_model_type(tiny_llama_dir):
    folder, _ = tiny_llama_dir
    with pytest.raises(ValueError, match="GEMMA"):
        load_base_state_dict(folder, "GEMMA")


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    reference = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = llama3_2(
        vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576, max_seq_len=2048,
        intermediate_dim=1536, rope_base=100_000, scale_factor=1, norm_eps=1e-5,
    ).eval()
    model.load_state_dict(load_base_state_dict(smollm2_dir, "LLAMA3_2"), strict=True)
    tokens = tokenizer(
        "Gravity pulls the apple toward the ground, so it falls from the tree.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = model(tokens)
    assert (actual - expected).abs().max().item() < 1e-3


@pytest.fixture(scope="module")
def smollm2_dir():
    from mol_tune.checkpointing.convert_gguf import prepare_default_model

    return prepare_default_model()
