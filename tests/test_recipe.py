"""Short runs of the mol_finetune recipe on the real default model and data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mol_tune.checkpointing import load_mol_model
from mol_tune.checkpointing.convert_gguf import prepare_default_model
from mol_tune.data.pipeline import build_dataloader
from mol_tune.data.prepare_digits import prepare_digits
from mol_tune.data.prepare_text import prepare_text
from mol_tune.training.loss import per_modality_cross_entropy

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "mol_tune" / "configs" / "smollm2_135m_digits.yaml"
SMALL_RUN = ["data.seq_len=128", "model.max_seq_len=128", "data.batch_size=2", "lr_scheduler.num_warmup_steps=1"]


@pytest.fixture(scope="module")
def default_assets():
    model_dir = prepare_default_model()
    data_dir = model_dir.parent.parent / "data" / "digits"
    prepare_digits(str(model_dir), str(data_dir))
    prepare_text(str(model_dir), str(model_dir.parent.parent / "data" / "sklearn_text"))
    return model_dir, data_dir


def run_recipe(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = ["tune", "run", "mol_tune/recipes/mol_finetune", "--config", str(CONFIG), f"output_dir={output_dir}"]
    command += SMALL_RUN + list(overrides)
    result = subprocess.run(command, capture_output=True, text=True, cwd=output_dir.parent, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_scalars(log_dir: Path) -> dict:
    """Read torchtune's TensorBoard scalars, which it writes as tensor summaries."""
    values = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            values[tag] = {e.step: float(torch.tensor(e.tensor_proto.float_val)[0]) for e in accumulator.Tensors(tag)}
    return values


def test_recipe_logs_and_checkpoint_reloads(default_assets, tmp_path):
    _, data_dir = default_assets
    output_dir = tmp_path / "run"
    # A curriculum on the 16-code image spans that drops nothing, so only its logging shows.
    curriculum = ["data.curriculum.image.schedule=linear", "data.curriculum.image.start=16",
                  "data.curriculum.image.end=20", "data.curriculum.image.num_steps=2"]
    run_recipe(output_dir, "max_steps=2", "eval_every_n_steps=2", "save_every_n_steps=0", *curriculum)

    scalars = read_scalars(output_dir / "logs")
    for tag in ["loss/train", "loss/train/text", "loss/train/image", "loss/val/text", "loss/val/image",
                "loss/val/digits/image", "loss/val/digits/text", "loss/val/sklearn_text/text",
                "lr/base", "lr/text", "lr/image", "grad_norm", "tokens_per_second",
                "data/token_share/image", "data/token_share/text"]:
        assert tag in scalars, sorted(scalars)
    assert sorted(scalars["loss/train/image"]) == [1, 2]
    assert sorted(scalars["loss/val/image"]) == [0, 2]
    # Step N logs the limit of the batches that made step N, the schedule's value at N - 1.
    assert scalars["curriculum/max_image_tokens"] == {1: 16.0, 2: 18.0}
    assert scalars["curriculum/dropped_samples"] == {1: 0.0, 2: 0.0}

    # The reloaded checkpoint must reproduce the validation loss the run logged at its last step.
    model = load_mol_model(output_dir / "step_2")
    model.eval()
    loader = build_dataloader([str(data_dir / "validation.parquet")], model.layout, seq_len=128, batch_size=2,
                              eos_id=0, pad_id=2, infinite=False, shuffle=False)
    sums = torch.zeros(2)
    counts = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
            targets = model.router(batch["labels"].clamp(min=0))
            _, batch_sums, batch_counts = per_modality_cross_entropy(logits, batch["labels"], targets, 2)
            sums += batch_sums
            counts += batch_counts
    assert abs((sums[1] / counts[1]).item() - scalars["loss/val/digits/image"][2]) < 1e-4
    assert abs((sums[0] / counts[0]).item() - scalars["loss/val/digits/text"][2]) < 1e-4
    # The digits are the only image data, so the image loss over all data sets is theirs.
    assert abs(scalars["loss/val/image"][2] - scalars["loss/val/digits/image"][2]) < 1e-6


def test_recipe_resume_matches_uninterrupted(default_assets, tmp_path):
    straight = tmp_path / "straight"
    run_recipe(straight, "max_steps=3", "eval_every_n_steps=0", "save_every_n_steps=1")
    resumed = tmp_path / "resumed"
    run_recipe(resumed, "max_steps=3", "eval_every_n_steps=0", "save_every_n_steps=0",
               f"resume_from_checkpoint={straight / 'step_1'}")

    expected = load_file(straight / "step_3" / "adapter_model.safetensors")
    actual = load_file(resumed / "step_3" / "adapter_model.safetensors")
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_recipe_rejects_lr_for_missing_modality(default_assets, tmp_path):
    command = ["tune", "run", "mol_tune/recipes/mol_finetune", "--config", str(CONFIG),
               f"output_dir={tmp_path / 'bad'}", "max_steps=1", "lr.speech=1e-3"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode != 0
    assert "Invalid learning rate for ['speech']" in result.stderr


def test_recipe_keeps_earlier_checkpoints(default_assets, tmp_path):
    output_dir = tmp_path / "earlier"
    (output_dir / "step_5").mkdir(parents=True)
    marker = output_dir / "step_5" / "mol_config.json"
    marker.write_text('{"kept": true}')
    command = ["tune", "run", "mol_tune/recipes/mol_finetune", "--config", str(CONFIG),
               f"output_dir={output_dir}", "max_steps=1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode != 0
    assert "already holds checkpoints of an earlier run (step_5)" in result.stderr
    assert marker.read_text() == '{"kept": true}'
