"""Tests for parameter counting per group and the ``mol-tune params`` command.

References are computed independently: from layer shapes with the LoRA formula
``r * (in + out)`` per projection, or by summing ``numel`` over torchtune's unmodified model.
"""

import argparse
import re

import pytest
import torch
from torch import nn

from mol_tune import params
from mol_tune.params import ParameterGroup, count_parameters, format_table, parameter_group

DIM, HEADS, KV_HEADS, LAYERS, FFN, VOCAB, RANK = 64, 4, 2, 3, 96, 100, 4
HEAD_DIM = DIM // HEADS


@pytest.mark.parametrize(
    "name, group",
    [
        ("tok_embeddings.weight", "embeddings"),
        ("tok_embeddings.projections.image.weight", "embeddings"),
        ("layers.0.attn.q_proj.lora_a.image.weight", "adapters/image"),
        ("layers.11.mlp.w1.lora_b.text.weight", "adapters/text"),
        ("layers.0.attn.v_proj.lora_a.shared.weight", "adapters/shared"),
        ("layers.0.attn.q_proj.lora_a.weight", "adapters"),
        ("layers.0.attn.q_proj.magnitude", "adapters"),
        ("layers.3.sa_norm.scales.speech", "norms/speech"),
        ("layers.0.attn.q_proj.weight", "base"),
        ("layers.0.sa_norm.scale", "base"),
        ("norm.scale", "base"),
        ("output.weight", "base"),
    ],
)
def test_parameter_group_names(name, group):
    assert parameter_group(name) == group


class _ToyProjection(nn.Module):
    def __init__(self, in_dim, out_dim, modalities):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_dim, in_dim), requires_grad=False)
        self.lora_a = nn.ModuleDict({m: nn.Linear(in_dim, RANK, bias=False) for m in modalities})
        self.lora_b = nn.ModuleDict({m: nn.Linear(RANK, out_dim, bias=False) for m in modalities})


class _ToyModel(nn.Module):
    """MoL-style names: q and v projections with per-modality adapters and per-modality norms."""

    def __init__(self, modalities):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList()
        for _ in range(LAYERS):
            layer = nn.Module()
            layer.attn = nn.Module()
            layer.attn.q_proj = _ToyProjection(DIM, DIM, modalities)
            layer.attn.v_proj = _ToyProjection(DIM, KV_HEADS * HEAD_DIM, modalities)
            layer.sa_norm = nn.Module()
            layer.sa_norm.scales = nn.ParameterDict({m: nn.Parameter(torch.ones(DIM)) for m in modalities})
            self.layers.append(layer)
        self.norm = nn.Module()
        self.norm.scale = nn.Parameter(torch.ones(DIM), requires_grad=False)
        # Tied head: the same tensor under a second name must count once.
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.output.weight = self.tok_embeddings.weight


def _by_name(groups):
    return {group.name: group for group in groups}


def test_count_toy_model():
    modalities = ["text", "image", "speech"]
    groups = _by_name(count_parameters(_ToyModel(modalities)))

    adapter_size = LAYERS * (RANK * (DIM + DIM) + RANK * (DIM + KV_HEADS * HEAD_DIM))
    for m in modalities:
        assert groups[f"adapters/{m}"].total == adapter_size
        assert groups[f"adapters/{m}"].trainable == adapter_size
        assert groups[f"norms/{m}"].total == LAYERS * DIM
    assert groups["embeddings"].total == VOCAB * DIM
    assert groups["embeddings"].trainable == VOCAB * DIM
    assert groups["base"].total == LAYERS * (DIM * DIM + KV_HEADS * HEAD_DIM * DIM) + DIM
    assert groups["base"].trainable == 0


def test_count_order():
    names = [g.name for g in count_parameters(_ToyModel(["image", "text"]))]
    assert names == ["embeddings", "adapters/text", "adapters/image", "norms/text", "norms/image", "base"]


def test_count_frozen_embeddings():
    model = _ToyModel(["text"])
    model.tok_embeddings.weight.requires_grad_(False)
    groups = _by_name(count_parameters(model))
    assert groups["embeddings"].trainable == 0
    assert groups["embeddings"].total == VOCAB * DIM


def _lora_size(projections, with_mlp):
    """LoRA parameters of one layer: r * (in + out) per adapted projection."""
    shapes = {
        "q_proj": (DIM, HEADS * HEAD_DIM),
        "k_proj": (DIM, KV_HEADS * HEAD_DIM),
        "v_proj": (DIM, KV_HEADS * HEAD_DIM),
        "output_proj": (HEADS * HEAD_DIM, DIM),
    }
    size = sum(RANK * sum(shapes[p]) for p in projections)
    if with_mlp:
        size += 3 * RANK * (DIM + FFN)
    return size


def _plain_llama_base_size():
    """Parameters of torchtune's unmodified llama3_2 outside embeddings and the per-layer norms."""
    from torchtune.models.llama3_2._component_builders import llama3_2

    with torch.device("meta"):
        model = llama3_2(
            vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
            max_seq_len=64, intermediate_dim=FFN,
        )
    layer_norm = re.compile(r"^layers\.\d+\.(sa|mlp)_norm\.scale$")
    return sum(
        p.numel() for name, p in model.named_parameters()
        if not name.startswith("tok_embeddings.") and not layer_norm.match(name)
    ), sum(p.numel() for name, p in model.named_parameters() if layer_norm.match(name))


@pytest.mark.parametrize("with_mlp", [False, True])
def test_torchtune_lora_formula(with_mlp):
    from torchtune.models.llama3_2._component_builders import lora_llama3_2

    projections = ["q_proj", "k_proj", "v_proj", "output_proj"]
    with torch.device("meta"):
        model = lora_llama3_2(
            lora_attn_modules=projections, apply_lora_to_mlp=with_mlp, vocab_size=VOCAB, num_layers=LAYERS,
            num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM, max_seq_len=64, intermediate_dim=FFN,
            lora_rank=RANK, lora_alpha=8,
        )
    assert params.freeze_like_torchtune_lora(model)
    groups = _by_name(count_parameters(model))
    base_size, norm_size = _plain_llama_base_size()

    assert groups["adapters"].total == LAYERS * _lora_size(projections, with_mlp)
    assert groups["adapters"].trainable == groups["adapters"].total
    assert groups["embeddings"].total == VOCAB * DIM
    assert groups["embeddings"].trainable == 0
    assert groups["base"].total == base_size + norm_size
    assert groups["base"].trainable == 0
    assert all(p.device.type == "meta" for p in model.parameters())


MODALITIES = [{"name": "image", "num_codes": 32, "codebook_dim": 8}, {"name": "speech", "num_codes": 16, "codebook_dim": 4}]


def _mol_model(**kwargs):
    from mol_tune.models import mol_llama3_2

    with torch.device("meta"):
        return mol_llama3_2(
            vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
            max_seq_len=64, intermediate_dim=FFN, modalities=MODALITIES, lora_rank=RANK, lora_alpha=8, **kwargs,
        )


@pytest.mark.parametrize("with_mlp", [False, True])
def test_mol_adapter_formula(with_mlp):
    projections = ["q_proj", "k_proj", "v_proj", "output_proj"]
    groups = _by_name(count_parameters(_mol_model(apply_lora_to_mlp=with_mlp)))
    base_size, _ = _plain_llama_base_size()

    for m in ["text", "image", "speech"]:
        assert groups[f"adapters/{m}"].total == LAYERS * _lora_size(projections, with_mlp)
        assert groups[f"adapters/{m}"].trainable == groups[f"adapters/{m}"].total
        # sa_norm and mlp_norm in every layer.
        assert groups[f"norms/{m}"].total == 2 * LAYERS * DIM
    new_tokens = sum(m["num_codes"] + 2 for m in MODALITIES)
    projection_size = sum(DIM * m["codebook_dim"] for m in MODALITIES)
    assert groups["embeddings"].total == (VOCAB + new_tokens) * DIM + projection_size
    assert groups["base"].total == base_size
    assert groups["base"].trainable == 0


def test_mol_shared_adapter_formula():
    projections = ["q_proj", "v_proj"]
    groups = _by_name(count_parameters(_mol_model(adapter_mode="shared", lora_attn_modules=projections)))
    adapter_groups = [name for name in groups if name.startswith("adapters")]
    assert adapter_groups == ["adapters/shared"]
    assert groups["adapters/shared"].total == LAYERS * _lora_size(projections, with_mlp=False)


def test_format_table():
    table = format_table([ParameterGroup("adapters/image", 1_234_567, 1_234_567), ParameterGroup("base", 0, 7_654_321)])
    lines = table.splitlines()
    assert lines[0].split() == ["group", "trainable", "total"]
    assert lines[2].split() == ["adapters/image", "1,234,567", "(1.23M)", "1,234,567", "(1.23M)"]
    assert lines[3].split() == ["base", "0", "(0.00M)", "7,654,321", "(7.65M)"]
    assert lines[5].split() == ["total", "1,234,567", "(1.23M)", "8,888,888", "(8.89M)"]
    assert "13.89%" in lines[6]


def test_parse_modality():
    assert params.parse_modality("image:8192:256") == {"name": "image", "num_codes": 8192, "codebook_dim": 256}
    for text in ["image:8192", "image:many:256", "image:1:2:3"]:
        with pytest.raises(argparse.ArgumentTypeError):
            params.parse_modality(text)


TOY_CONFIG = f"""\
model:
  _component_: torchtune.models.llama3_2.lora_llama3_2
  lora_attn_modules: [q_proj, v_proj]
  vocab_size: {VOCAB}
  num_layers: {LAYERS}
  num_heads: {HEADS}
  num_kv_heads: {KV_HEADS}
  embed_dim: {DIM}
  max_seq_len: 64
  intermediate_dim: {FFN}
  lora_rank: {RANK}
  lora_alpha: 8
"""


def _total_row(output):
    return next(line for line in output.splitlines() if line.startswith("total")).split()


def test_params_command_config(tmp_path, capsys):
    from omegaconf import OmegaConf
    from torchtune import config

    path = tmp_path / "toy.yaml"
    path.write_text(TOY_CONFIG)
    params.main(["--config", str(path), "model.lora_rank=2"])

    reference = config.instantiate(OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(["model.lora_rank=2"])).model)
    total = sum(p.numel() for p in reference.parameters())
    adapters = sum(p.numel() for name, p in reference.named_parameters() if "lora_" in name)
    assert _total_row(capsys.readouterr().out)[1:4:2] == [f"{adapters:,}", f"{total:,}"]


def test_params_command_builder(capsys):
    params.main(["--builder", "mol_smollm2_135m", "--modality", "image:64:8", "lora_rank=2"])
    output = capsys.readouterr().out
    assert "adapters/image" in output
    assert "norms/text" in output


def test_params_builds_on_meta(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_CONFIG)
    model = params.build_from_config(str(path), [], argparse.ArgumentParser())
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "mol_finetune/absent"],
        ["--builder", "mol_absent_7b"],
        ["--builder", "mol_smollm2_135m", "lora_rank"],
        ["--config", "x.yaml", "--modality", "image:1:1"],
    ],
)
def test_params_command_errors(argv, capsys):
    with pytest.raises(SystemExit) as error:
        params.main(argv)
    assert error.value.code == 2
    assert "error:" in capsys.readouterr().err
