"""Recipe: fine-tune a frozen text LLM on multimodal token data with Mixture-of-LoRA.

Run with ``tune run mol_tune/recipes/mol_finetune --config <yaml>`` (or ``mol-tune run``).
Trains the per-modality adapters, norms and the extended embeddings. Loss is logged to
TensorBoard in total and per modality of the target token, for training and validation.
"""

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from torchdata.nodes import Loader
from torchtune import config, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface

from mol_tune.checkpointing.base import load_base_state_dict
from mol_tune.checkpointing.mol_checkpoint import load_mol_state, save_mol_checkpoint
from mol_tune.data.config import build_training_loader, build_validation_loaders
from mol_tune.data.image_vq import codebook_fingerprint
from mol_tune.data.mixture import count_modality_tokens
from mol_tune.data.tokenizer_match import check_text_tokenizer
from mol_tune.training.loss import IGNORE_INDEX, per_modality_cross_entropy
from mol_tune.training.param_groups import build_param_groups

log = utils.get_logger("INFO")

RECIPE_STATE_FILE = "recipe_state.pt"


def expand_path(path: Any) -> Path:
    return Path(os.path.expandvars(str(path))).expanduser()


def format_losses(losses: Dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in losses.items())


def check_loop_settings(cfg: DictConfig) -> None:
    """Raise ValueError naming the config key of an invalid loop or length setting."""
    minimums = {
        "max_steps": 0,
        "gradient_accumulation_steps": 1,
        "log_every_n_steps": 1,
        "eval_every_n_steps": 0,
        "save_every_n_steps": 0,
    }
    for key, minimum in minimums.items():
        value = cfg.get(key, minimum)
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"Invalid {key}: {value!r}. It must be an integer >= {minimum}.")
    seq_len = cfg.data.get("seq_len", None)
    max_seq_len = cfg.model.get("max_seq_len", None)
    if seq_len is not None and max_seq_len is not None and int(seq_len) > int(max_seq_len):
        raise ValueError(
            f"Invalid data.seq_len: {seq_len} is longer than model.max_seq_len ({max_seq_len}). "
            "Raise model.max_seq_len or lower data.seq_len."
        )


def find_earlier_checkpoints(output_dir: Path) -> List[Path]:
    """Return the step_<N> folders in ``output_dir`` that hold a saved MoL checkpoint."""
    return sorted(p for p in output_dir.glob("step_*") if (p / "mol_config.json").is_file())


class MoLFinetuneRecipe(FTRecipeInterface):
    """Mixture-of-LoRA fine-tuning on one device.

    Config sections: ``model`` (a ``mol_tune.models`` builder), ``base_checkpoint`` (the pretrained
    Hugging Face folder and its model type), ``tokenizers`` (one per non-text modality, giving its
    codebook), ``data``, ``optimizer``, ``lr`` (one learning rate per parameter group),
    ``lr_scheduler``, ``metric_logger`` and the loop settings. See the shipped YAML files.

    NOTE: multi-process training (FSDP2) is not wired in yet; the recipe raises when started
    with more than one process.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.device = utils.get_device(cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.output_dir = expand_path(cfg.output_dir)
        self.max_steps = int(cfg.max_steps)
        self.grad_accumulation = int(cfg.gradient_accumulation_steps)
        self.clip_grad_norm = cfg.get("clip_grad_norm", None)
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        self.eval_every = int(cfg.get("eval_every_n_steps", 0))
        self.save_every = int(cfg.get("save_every_n_steps", 0))
        self.step = 0
        self.final_losses: Dict[str, float] = {}
        check_loop_settings(cfg)
        self.seed = training.set_seed(seed=cfg.seed)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("mol_finetune runs in one process for now; start it without --nproc_per_node.")

    def setup(self, cfg: DictConfig) -> None:
        resume_dir = cfg.get("resume_from_checkpoint", None)
        earlier = find_earlier_checkpoints(self.output_dir)
        if earlier and not resume_dir:
            raise FileExistsError(
                f"output_dir {self.output_dir} already holds checkpoints of an earlier run "
                f"({', '.join(p.name for p in earlier)}). Set another output_dir, or continue that run "
                f"with resume_from_checkpoint={earlier[-1]}."
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metric_logger = config.instantiate(cfg.metric_logger)
        self.metric_logger.log_config(cfg)

        self.model = self._setup_model(cfg)
        self.modality_names = self.model.layout.modality_names
        self.modality_tokens = torch.zeros(len(self.modality_names), dtype=torch.long)
        self.optimizer = self._setup_optimizer(cfg)
        self.lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self.optimizer, num_training_steps=self.max_steps, last_epoch=-1
        )
        self.train_loader = self._setup_data(cfg)

        if resume_dir:
            self._resume(expand_path(resume_dir))

    def _setup_model(self, cfg: DictConfig) -> torch.nn.Module:
        with training.set_default_dtype(self.dtype), self.device:
            model = config.instantiate(cfg.model)
        base_dir = expand_path(cfg.base_checkpoint.checkpoint_dir)
        base_state = load_base_state_dict(base_dir, cfg.base_checkpoint.model_type)
        model.load_base_state_dict(base_state)
        del base_state

        self.codebook_fingerprints = {}
        for modality in model.layout.modalities:
            if modality.name not in cfg.get("tokenizers", {}):
                raise ValueError(
                    f"Missing tokenizer for modality {modality.name!r}: add `tokenizers.{modality.name}` "
                    "to the config so the model can take its codebook."
                )
            tokenizer = config.instantiate(cfg.tokenizers[modality.name])
            model.tok_embeddings.set_codebook(modality.name, tokenizer.codebook)
            self.codebook_fingerprints[modality.name] = tokenizer.fingerprint
        generator = torch.Generator().manual_seed(self.seed)
        stats = model.tok_embeddings.initialize_new_embeddings(generator)
        log.info(
            f"Initialised {model.layout.num_new_tokens} new embeddings from the codebooks "
            f"(text embedding mean norm {stats['text_mean_norm']:.3f}, spread {stats['text_rms_spread']:.3f})"
        )

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info(f"Model {model.build_config.get('builder')}: {trainable:,} trainable of {total:,} parameters")
        if cfg.get("compile", False):
            training.compile_model(model)
            log.info("Compiled each decoder layer with torch.compile")
        return model

    def _setup_optimizer(self, cfg: DictConfig) -> torch.optim.Optimizer:
        weight_decay = float(cfg.optimizer.get("weight_decay", 0.0))
        groups = build_param_groups(self.model, OmegaConf.to_container(cfg.lr), weight_decay)
        optimizer = config.instantiate(cfg.optimizer, groups)
        for group in groups:
            count = sum(p.numel() for p in group["params"])
            log.info(f"Optimizer group {group['name']}: {count:,} parameters, lr {group['lr']:g}")
        return optimizer

    def _setup_data(self, cfg: DictConfig) -> Loader:
        """Build the training loader that mixes the data sets, and the factory of validation loaders."""
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
        options = dict(seed=self.seed, rank=rank, world_size=world_size, codebook_fingerprints=self.codebook_fingerprints)
        check_text_tokenizer(cfg.data, str(expand_path(cfg.base_checkpoint.checkpoint_dir)))
        loader, plan = build_training_loader(
            cfg.data, self.model.layout, batches_per_step=self.grad_accumulation, **options
        )
        for line in plan.describe():
            log.info(line)
        self.val_loader_factory = lambda: build_validation_loaders(cfg.data, self.model.layout, **options)
        return loader

    def _resume(self, checkpoint_dir: Path) -> None:
        state_path = checkpoint_dir / RECIPE_STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(
                f"Cannot resume from {checkpoint_dir}: {RECIPE_STATE_FILE} not found. Point "
                "resume_from_checkpoint at a step_<N> folder written by this recipe."
            )
        load_mol_state(self.model, checkpoint_dir)
        for name, expected in self.codebook_fingerprints.items():
            saved = codebook_fingerprint(getattr(self.model.tok_embeddings.codebooks, name))
            if saved != expected:
                raise ValueError(
                    f"Cannot resume from {checkpoint_dir}: its {name} codebook (sha256 {saved[:16]}) differs from "
                    f"the configured tokenizers.{name} (sha256 {expected[:16]}). The data was re-tokenized "
                    "since that run; point the config at the tokenizer and shards the run started with."
                )
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.train_loader.load_state_dict(state["train_loader"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if "modality_tokens" in state:
            self.modality_tokens = state["modality_tokens"].clone()
        if self.step > self.max_steps:
            raise ValueError(
                f"Invalid max_steps: {self.max_steps} is below step {self.step} of {checkpoint_dir}. "
                "Raise max_steps to continue the run."
            )
        log.info(f"Resumed from {checkpoint_dir} at step {self.step}")

    def save_checkpoint(self, final: bool = False) -> Path:
        """Write adapters, norms, new embeddings and the recipe state to ``output_dir/step_<N>``."""
        checkpoint_dir = self.output_dir / f"step_{self.step}"
        save_mol_checkpoint(
            self.model,
            checkpoint_dir,
            step=self.step,
            base_checkpoint_dir=expand_path(self.cfg.base_checkpoint.checkpoint_dir),
            base_model_type=str(self.cfg.base_checkpoint.model_type),
        )
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "rng": torch.get_rng_state(),
            "modality_tokens": self.modality_tokens.clone(),
        }
        temporary = checkpoint_dir / (RECIPE_STATE_FILE + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, checkpoint_dir / RECIPE_STATE_FILE)
        log.info(f"Saved {'final ' if final else ''}checkpoint to {checkpoint_dir}")
        return checkpoint_dir

    def _batch_loss(self, batch: Dict[str, torch.Tensor]):
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        logits = self.model(tokens, mask=batch["mask"].to(self.device), input_pos=batch["input_pos"].to(self.device))
        target_modalities = self.model.router(labels.clamp(min=0))
        return per_modality_cross_entropy(logits, labels, target_modalities, len(self.modality_names))

    def _named_losses(self, sums: torch.Tensor, counts: torch.Tensor) -> Dict[str, float]:
        losses = {"all": (sums.sum() / counts.sum().clamp(min=1)).item()}
        for index, name in enumerate(self.modality_names):
            if counts[index] > 0:
                losses[name] = (sums[index] / counts[index]).item()
        return losses

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Return the mean validation loss over every data set's whole validation split.

        Keys: ``all`` and each target modality over all data sets, and ``<data set>/<modality>``.
        """
        self.model.eval()
        sums = torch.zeros(len(self.modality_names), device=self.device)
        counts = torch.zeros(len(self.modality_names), device=self.device, dtype=torch.long)
        per_dataset = {}
        for name, loader in self.val_loader_factory().items():
            dataset_sums = torch.zeros_like(sums)
            dataset_counts = torch.zeros_like(counts)
            for batch in loader:
                _, batch_sums, batch_counts = self._batch_loss(batch)
                dataset_sums += batch_sums
                dataset_counts += batch_counts
            sums += dataset_sums
            counts += dataset_counts
            for modality, loss in self._named_losses(dataset_sums, dataset_counts).items():
                if modality != "all":
                    per_dataset[f"{name}/{modality}"] = loss
        self.model.train()
        return {**self._named_losses(sums, counts), **per_dataset}

    def _log_validation(self) -> Dict[str, float]:
        losses = self.validate()
        self.metric_logger.log_dict(
            {("loss/val" if k == "all" else f"loss/val/{k}"): v for k, v in losses.items()}, step=self.step
        )
        log.info(f"Step {self.step} validation loss: {format_losses(losses)}")
        return losses

    def token_shares(self) -> Dict[str, float]:
        """Return each modality's share of the tokens trained on so far in this run, resumes included."""
        total = max(int(self.modality_tokens.sum()), 1)
        return {name: int(count) / total for name, count in zip(self.modality_names, self.modality_tokens)}

    def _data_metrics(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """Return the running token shares and, with a curriculum, its maxima and drops at this batch."""
        metrics = {f"data/token_share/{name}": share for name, share in self.token_shares().items()}
        curriculum = batch.get("curriculum")
        if curriculum is not None:
            for name, limit in curriculum["max_span_tokens"].items():
                metrics[f"curriculum/max_{name}_tokens"] = limit
            metrics["curriculum/dropped_samples"] = curriculum["dropped_samples"]
        # Running counts of shards, rows and samples the loader skipped, e.g. data/skipped/samples/too_long.
        for reason, count in batch.get("skipped", {}).items():
            metrics[f"data/skipped/{reason}"] = count
        return metrics

    def train(self) -> None:
        if self.step >= self.max_steps:
            log.info(f"Nothing to train: the run is at step {self.step} and max_steps is {self.max_steps}.")
            return
        self.model.train()
        train_iter = iter(self.train_loader)
        with logging_redirect_tqdm(loggers=[log]):
            if self.step == 0 and self.eval_every > 0:
                self._log_validation()
            progress = tqdm(total=self.max_steps, initial=self.step, desc="mol_finetune", dynamic_ncols=True)
            while self.step < self.max_steps:
                self._train_step(train_iter, progress)
            progress.close()
        log.info(f"Token shares trained on: {format_losses(self.token_shares())}")
        log.info(f"Step {self.step} training loss: {format_losses(self.final_losses)}")

    def _train_step(self, train_iter, progress: tqdm) -> None:
        """Run one optimizer step over ``gradient_accumulation_steps`` batches, then log, validate and save."""
        started = time.perf_counter()
        sums = torch.zeros(len(self.modality_names), device=self.device)
        counts = torch.zeros(len(self.modality_names), device=self.device, dtype=torch.long)
        num_tokens = 0
        for _ in range(self.grad_accumulation):
            batch = next(train_iter)
            loss_sum, batch_sums, batch_counts = self._batch_loss(batch)
            loss_sum.backward()
            sums += batch_sums
            counts += batch_counts
            num_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            self.modality_tokens += count_modality_tokens(batch, self.model.layout).cpu()

        losses = self._named_losses(sums, counts)
        if not math.isfinite(losses["all"]):
            # Stop before the optimizer step, so the weights and the last checkpoint stay finite.
            raise RuntimeError(
                f"Non-finite training loss {losses['all']} at step {self.step + 1}; stopping without updating "
                "the weights. Lower the learning rates or check the data of this step."
            )
        # Normalise by the target tokens of the whole accumulated step, not per micro-batch.
        training.scale_grads(self.model, 1.0 / counts.sum().clamp(min=1))
        grad_norm = None
        if self.clip_grad_norm is not None:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=float(self.clip_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.step += 1
        self.final_losses = losses
        progress.update(1)
        progress.set_postfix(loss=f"{losses['all']:.3f}")

        if self.step % self.log_every == 0:
            metrics = {("loss/train" if k == "all" else f"loss/train/{k}"): v for k, v in losses.items()}
            for group in self.optimizer.param_groups:
                metrics[f"lr/{group['name']}"] = group["lr"]
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            # Measured over this step alone, so validation and checkpoint time are left out.
            metrics["tokens_per_second"] = num_tokens / max(time.perf_counter() - started, 1e-9)
            metrics.update(self._data_metrics(batch))
            self.metric_logger.log_dict(metrics, step=self.step)

        if self.eval_every > 0 and self.step % self.eval_every == 0:
            self._log_validation()
        if self.save_every > 0 and self.step % self.save_every == 0 and self.step < self.max_steps:
            self.save_checkpoint()

    def cleanup(self) -> None:
        self.metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="MoLFinetuneRecipe", cfg=cfg)
    recipe = MoLFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    start_step = recipe.step
    recipe.train()
    if recipe.step > start_step:
        recipe.save_checkpoint(final=True)
        summary = {"step": recipe.step, "final_train_loss": recipe.final_losses, "token_shares": recipe.token_shares()}
        (recipe.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
