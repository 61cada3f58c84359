"""The MoL decoder against the unmodified torchtune decoders it extends."""

import pytest
import torch
import torch.nn.functional as F

from conftest import mixed_tokens, randomize_adapters, tiny_llama_pair, tiny_qwen_pair

ADAPTER_SETTINGS = [
    {},
    {"adapter_mode": "shared"},
    {"apply_lora_to_mlp": True},
    {"lora_attn_modules": ["q_proj", "v_proj"], "adapter_modalities": ["image"]},
    {"per_modality_norms": False},
]


@pytest.mark.parametrize("make_pair", [tiny_llama_pair, tiny_qwen_pair], ids=["llama3_2", "qwen2"])
@pytest.mark.parametrize("settings", ADAPTER_SETTINGS, ids=str)
def test_zero_adapters_match_base_model(make_pair, settings):
    base, model = make_pair(**settings)
    tokens = torch.randint(0, base.tok_embeddings.num_embeddings, (2, 12))
    expected = base(tokens)
    logits = model(tokens)
    assert logits.shape[-1] == model.layout.vocab_size
    torch.testing.assert_close(logits[..., : expected.shape[-1]], expected, rtol=1e-5, atol=1e-5)


def test_adapters_change_only_their_modality():
    _, model = tiny_llama_pair(adapter_modalities=["image"])
    layout = model.layout
    text_only = torch.randint(0, layout.base_vocab_size, (2, 10))
    before = model(text_only)
    randomize_adapters(model)
    after_text = model(text_only)
    torch.testing.assert_close(after_text, before)

    with_image = text_only.clone()
    with_image[:, 3] = layout.code_range("image")[0]
    assert not torch.allclose(model(with_image), before)


def test_image_loss_leaves_text_adapters_zero():
    _, model = tiny_llama_pair()
    randomize_adapters(model)
    start, end = model.layout.code_range("image")
    image_only = torch.randint(start, end, (2, 10))
    logits = model(image_only)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), image_only[:, 1:].flatten()).backward()

    grads = {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}
    text = [g for n, g in grads.items() if ".text." in n]
    image = [g for n, g in grads.items() if ".image." in n]
    assert text and image
    assert all(g is None or torch.count_nonzero(g) == 0 for g in text)
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in image)


def test_text_loss_leaves_image_adapters_zero():
    _, model = tiny_llama_pair()
    randomize_adapters(model)
    text_only = torch.randint(0, model.layout.base_vocab_size, (2, 10))
    logits = model(text_only)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), text_only[:, 1:].flatten()).backward()

    # The tied head still sends gradient to the code embeddings through the softmax, so only
    # adapters and norms are checked.
    for name, parameter in model.named_parameters():
        routed = ".lora_" in name or ".scales." in name
        if routed and (".image" in name or ".speech" in name):
            assert parameter.grad is None or torch.count_nonzero(parameter.grad) == 0, name
        if ".lora_b.text." in name:
            assert torch.count_nonzero(parameter.grad) > 0, name


def test_kv_cache_decoding_matches_full_forward():
    _, model = tiny_llama_pair()
    randomize_adapters(model)
    model.eval()
    tokens = mixed_tokens(model.layout, batch_size=2, seq_len=14)
    with torch.no_grad():
        full = model(tokens)

        prompt_len, max_len = 5, 20
        model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=max_len)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        positions = torch.arange(prompt_len).expand(2, -1)
        steps = [model(tokens[:, :prompt_len], mask=causal[None, :prompt_len].expand(2, -1, -1), input_pos=positions)]
        for i in range(prompt_len, tokens.shape[1]):
            position = torch.full((2, 1), i)
            steps.append(model(tokens[:, i : i + 1], mask=causal[None, i : i + 1].expand(2, -1, -1), input_pos=position))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_token_beyond_vocab_names_value():
    _, model = tiny_llama_pair()
    tokens = torch.zeros(1, 4, dtype=torch.long)
    tokens[0, 2] = model.layout.vocab_size + 3
    with pytest.raises(ValueError, match=f"Invalid token id {model.layout.vocab_size + 3} at position \\(0, 2\\)"):
        model(tokens)


def test_trainable_parameters_follow_embedding_mode():
    for mode, text_trains, new_trains in [("all", True, True), ("new", False, True), ("none", False, False)]:
        _, model = tiny_llama_pair(embedding_training=mode)
        assert model.tok_embeddings.text_weight.requires_grad is text_trains
        assert model.tok_embeddings.new_weight.requires_grad is new_trains
        frozen_base = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("proj.weight")]
        assert frozen_base == []


def test_new_embeddings_match_text_statistics():
    _, model = tiny_llama_pair()
    embedding = model.tok_embeddings
    text = embedding.text_weight.detach()
    start, end = model.layout.code_range("image")
    rows = embedding.weight.detach()[start:end]
    text_spread = (text - text.mean(0)).pow(2).sum(-1).mean().sqrt()
    code_spread = (rows - rows.mean(0)).pow(2).sum(-1).mean().sqrt()
    torch.testing.assert_close(rows.mean(0), text.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(code_spread, text_spread, rtol=1e-4, atol=1e-4)


def test_load_base_rejects_wrong_architecture():
    base, _ = tiny_llama_pair()
    _, other = tiny_llama_pair()
    state = dict(base.state_dict())
    state["layers.7.attn.q_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="layers.7.attn.q_proj.weight"):
        other.load_base_state_dict(state)


def test_builder_records_default_modalities():
    from mol_tune.models import mol_qwen2_0_5b

    with torch.device("meta"):
        model = mol_qwen2_0_5b()
    names = [m["name"] for m in model.build_config["kwargs"]["modalities"]]
    assert names == ["image", "speech"]
    assert model.layout.vocab_size == 151_936 + 8192 + 256 + 4


def test_shared_mode_rejects_adapter_modalities():
    with pytest.raises(ValueError, match="adapter_mode 'shared'"):
        tiny_llama_pair(adapter_mode="shared", adapter_modalities=["image"])
