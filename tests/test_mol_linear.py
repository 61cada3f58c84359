"""MoLLinear against a naive per-token loop and against torchtune's LoRALinear."""

import itertools

import pytest
import torch

from torchtune.modules.peft import LoRALinear

from mol_tune.modules import ModalityRMSNorm, ModalityRouter, MoLLinear
from mol_tune.vocab import Modality, VocabularyLayout

NAMES = ["text", "image", "speech"]
ALL_SUBSETS = [list(s) for r in range(len(NAMES) + 1) for s in itertools.combinations(NAMES, r)]


def make_layer(adapters, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = MoLLinear(10, 7, modality_names=NAMES, adapter_modalities=adapters, rank=3, alpha=6.0, use_bias=bias)
    with torch.no_grad():
        for name in adapters:
            layer.lora_b[name].weight.normal_()
    return layer


def naive_forward(layer, x, modality_ids):
    """Apply W x + b and the adapter of each token's modality one token at a time."""
    rows = []
    flat_x = x.reshape(-1, x.shape[-1])
    for token_x, modality_id in zip(flat_x, modality_ids.reshape(-1).tolist()):
        y = layer.weight @ token_x
        if layer.bias is not None:
            y = y + layer.bias
        name = NAMES[modality_id]
        if name in layer.adapter_names:
            a = layer.lora_a[name].weight
            b = layer.lora_b[name].weight
            y = y + (layer.alpha / layer.rank) * (b @ (a @ token_x))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("adapters", ALL_SUBSETS, ids=lambda s: "+".join(s) or "none")
def test_mol_linear_matches_naive_loop(adapters):
    layer = make_layer(adapters)
    x = torch.randn(3, 9, 10, requires_grad=True)
    modality_ids = torch.randint(0, 3, (3, 9))
    upstream = torch.randn(3, 9, 7)

    out = layer(x, modality_ids)
    (out * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    x_grad = x.grad.clone()

    x.grad = None
    layer.zero_grad()
    reference = naive_forward(layer, x, modality_ids)
    (reference * upstream).sum().backward()

    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-5)
    for name, parameter in layer.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_mol_linear_base_weight_frozen():
    layer = make_layer(["text", "image"])
    assert not layer.weight.requires_grad
    assert not layer.bias.requires_grad
    assert all(p.requires_grad for n, p in layer.named_parameters() if "lora" in n)


def test_mol_linear_image_loss_leaves_text_zero():
    layer = make_layer(NAMES)
    x = torch.randn(2, 12, 10)
    modality_ids = torch.randint(0, 3, (2, 12))
    modality_ids[0, :3] = torch.tensor([0, 1, 2])
    out = layer(x, modality_ids)
    out[modality_ids == 1].pow(2).sum().backward()

    for tensor in (layer.lora_a["text"].weight.grad, layer.lora_b["text"].weight.grad):
        assert torch.count_nonzero(tensor) == 0
    for tensor in (layer.lora_a["speech"].weight.grad, layer.lora_b["speech"].weight.grad):
        assert torch.count_nonzero(tensor) == 0
    assert torch.count_nonzero(layer.lora_b["image"].weight.grad) > 0


def test_shared_mode_equals_torchtune_lora():
    torch.manual_seed(0)
    reference = LoRALinear(10, 7, rank=3, alpha=6.0, use_bias=True)
    with torch.no_grad():
        reference.lora_b.weight.normal_()
    layer = MoLLinear(10, 7, modality_names=NAMES, adapter_modalities=["shared"], rank=3, alpha=6.0, use_bias=True)
    layer.load_state_dict(
        {
            "weight": reference.weight,
            "bias": reference.bias,
            "lora_a.shared.weight": reference.lora_a.weight,
            "lora_b.shared.weight": reference.lora_b.weight,
        }
    )
    x = torch.randn(2, 5, 10)
    modality_ids = torch.randint(0, 3, (2, 5))
    upstream = torch.randn(2, 5, 7)

    out = layer(x, modality_ids)
    (out * upstream).sum().backward()
    expected = reference(x)
    (expected * upstream).sum().backward()

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer.lora_a["shared"].weight.grad, reference.lora_a.weight.grad)
    torch.testing.assert_close(layer.lora_b["shared"].weight.grad, reference.lora_b.weight.grad)


def test_mol_linear_rejects_unknown_modality():
    with pytest.raises(ValueError, match="video"):
        MoLLinear(4, 4, modality_names=NAMES, adapter_modalities=["video"], rank=2, alpha=2.0)


def test_modality_norm_matches_naive_loop():
    torch.manual_seed(0)
    norm = ModalityRMSNorm(8, NAMES, eps=1e-5)
    with torch.no_grad():
        for parameter in norm.scales.values():
            parameter.normal_()
    x = torch.randn(2, 6, 8)
    modality_ids = torch.randint(0, 3, (2, 6))
    out = norm(x, modality_ids)
    for b in range(2):
        for s in range(6):
            token = x[b, s]
            expected = token / torch.sqrt(token.pow(2).mean() + 1e-5) * norm.scales[NAMES[modality_ids[b, s]]]
            torch.testing.assert_close(out[b, s], expected)


def test_router_maps_ranges_and_delimiters():
    layout = VocabularyLayout(20, (Modality("image", 5, 2), Modality("speech", 3, 2)))
    router = ModalityRouter(layout)
    image_open, image_close = layout.delimiter_ids("image")
    tokens = torch.tensor([[0, 19, 20, 24, 25, 27, image_open, image_close, layout.vocab_size - 1]])
    expected = []
    for token in tokens[0].tolist():
        if 20 <= token < 25:
            expected.append(1)
        elif 25 <= token < 28:
            expected.append(2)
        else:
            expected.append(0)
    assert router(tokens).tolist() == [expected]
    assert layout.vocab_size == 20 + 5 + 3 + 4
