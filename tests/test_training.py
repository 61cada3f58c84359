"""Parameter groups and per-modality loss sums against plain references."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama_pair
from mol_tune.training.loss import per_modality_cross_entropy
from mol_tune.training.param_groups import build_param_groups


def test_param_groups_split_by_modality():
    _, model = tiny_llama_pair()
    groups = build_param_groups(model, {"base": 1e-3, "text": 1e-4, "image": 2e-3, "speech": 3e-3})
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["base", "image", "speech", "text"]
    assert by_name["image"]["lr"] == 2e-3

    expected = {"base": set(), "text": set(), "image": set(), "speech": set()}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        owner = "base"
        if ".lora_" in name or ".scales." in name:
            owner = next(m for m in ("text", "image", "speech") if f".{m}." in name or name.endswith(f".{m}"))
        expected[owner].add(id(parameter))
    for group in groups:
        assert {id(p) for p in group["params"]} == expected[group["name"]]


def test_param_groups_reject_unknown_modality():
    _, model = tiny_llama_pair(modalities=[{"name": "image", "num_codes": 12, "codebook_dim": 4}])
    with pytest.raises(ValueError, match=r"Invalid learning rate for \['speech'\]"):
        build_param_groups(model, {"base": 1e-3, "text": 1e-4, "image": 1e-3, "speech": 1e-3})


def test_param_groups_require_every_rate():
    _, model = tiny_llama_pair()
    with pytest.raises(ValueError, match="Missing learning rate"):
        build_param_groups(model, {"base": 1e-3, "text": 1e-4})
    groups = build_param_groups(model, {"default": 5e-4, "text": 1e-4})
    assert {g["name"]: g["lr"] for g in groups}["speech"] == 5e-4


def test_per_modality_loss_matches_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, 3] = -100
    modalities = torch.randint(0, 3, (2, 7))
    total, sums, counts = per_modality_cross_entropy(logits, labels, modalities, 3)

    expected_sums = torch.zeros(3)
    expected_counts = torch.zeros(3, dtype=torch.long)
    for b in range(2):
        for s in range(7):
            if labels[b, s] == -100:
                continue
            loss = F.cross_entropy(logits[b, s][None], labels[b, s][None])
            expected_sums[modalities[b, s]] += loss
            expected_counts[modalities[b, s]] += 1
    torch.testing.assert_close(sums, expected_sums)
    assert counts.tolist() == expected_counts.tolist()
    torch.testing.assert_close(total, expected_sums.sum())


def test_param_groups_reject_invalid_rates():
    _, model = tiny_llama_pair()
    for bad in (-1e-3, "abc", float("nan")):
        with pytest.raises(ValueError, match="Invalid lr.image"):
            build_param_groups(model, {"default": 1e-3, "image": bad})
