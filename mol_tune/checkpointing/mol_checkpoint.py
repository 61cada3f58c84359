"""MoL checkpoints: the trained state saved apart from the frozen base weights.

Per-modality adapters cannot be merged into one base weight (each token uses the adapter of
its own modality), so a MoL checkpoint stores only what MoL adds or trains, and the base
weights are loaded from the pretrained folder again. A checkpoint folder contains:

- ``adapter_model.safetensors``: every LoRA factor (``*.lora_a.*``, ``*.lora_b.*``), every
  per-modality norm scale (``*.scales.*``), the embedding state (``tok_embeddings.*``, with the
  pretrained ``text_weight`` rows only when they were trained), the codebook buffers, and any
  other parameter that has ``requires_grad`` set.
- ``mol_config.json``: the builder and its arguments (``model.build_config``), the vocabulary
  layout, the base checkpoint folder and torchtune model type, the parameter dtype, the saved keys,
  the training step and caller-supplied ``extra`` data.

``load_mol_model`` rebuilds a model from these two files and the base folder alone.
"""

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mol_tune.checkpointing.base import SUPPORTED_MODEL_TYPES, load_base_state_dict

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "mol_config.json"
FORMAT_VERSION = 1
BUILDER_PACKAGE = "mol_tune.models"
# Stored in both files; unequal values mean the two files come from different saves.
_SAVE_ID_KEY = "mol_save_id"
_TEXT_WEIGHT = "tok_embeddings.text_weight"


def mol_state_keys(model: nn.Module) -> List[str]:
    """Return the state-dict keys that a MoL checkpoint stores for ``model``, in state-dict order.

    The pretrained text embedding rows (``tok_embeddings.text_weight``) are included only when
    they have ``requires_grad`` set. Other pretrained weights are included only when a caller
    unfroze them.
    """
    parameters = dict(model.named_parameters())
    keys = []
    for key in model.state_dict():
        parameter = parameters.get(key)
        trainable = parameter is not None and parameter.requires_grad
        if key == _TEXT_WEIGHT:
            selected = trainable
        else:
            selected = (
                ".lora_a." in key
                or ".lora_b." in key
                or ".scales." in key
                or key.startswith("tok_embeddings.")
                or trainable
            )
        if selected:
            keys.append(key)
    return keys


def infer_model_type(builder: str) -> Optional[str]:
    """Return the torchtune model type of a builder's base checkpoints, or None if unknown."""
    name = builder.rsplit(".", 1)[-1]
    if "qwen2" in name:
        return "QWEN2"
    if "llama3_2" in name or "smollm2" in name:
        return "LLAMA3_2"
    return None


def save_mol_checkpoint(
    model: nn.Module,
    output_dir: Union[str, Path],
    step: Optional[int] = None,
    extra: Optional[Dict[str, Any]] = None,
    *,
    base_checkpoint_dir: Optional[Union[str, Path]] = None,
    base_model_type: Optional[str] = None,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
) -> Path:
    """Save the MoL state of ``model`` to ``output_dir``, without merging adapters into base weights.

    Both files are first written under temporary names in ``output_dir`` and then renamed over
    the old ones, weights first and config last. A save that fails while writing leaves the
    previous checkpoint in place. A crash between the two renames leaves files whose save ids
    differ, which ``load_mol_state`` rejects. Other files in ``output_dir`` are not touched.

    Args:
        model (nn.Module): a MoL model built by a ``mol_tune.models`` builder, with ``build_config``
            and ``layout``.
        output_dir (Union[str, Path]): checkpoint folder; created if missing.
        step (Optional[int]): training step recorded in ``mol_config.json``. Default: None.
        extra (Optional[Dict[str, Any]]): JSON-serialisable data recorded in ``mol_config.json``.
            Its ``base_checkpoint_dir`` and ``base_model_type`` entries are used when the keyword
            arguments of the same names are not given. Default: None.
        base_checkpoint_dir (Optional[Union[str, Path]]): Hugging Face folder of the base weights,
            recorded as an absolute path so ``load_mol_model`` can find it. Default: None.
        base_model_type (Optional[str]): torchtune model type of the base checkpoint. Default:
            inferred from the builder name (``LLAMA3_2`` or ``QWEN2``).
        state_dict (Optional[Dict[str, torch.Tensor]]): full (unsharded) state dict to save in
            place of ``model.state_dict()``, for example one gathered from a sharded model.
            Default: None.

    Returns:
        Path: ``output_dir``.

    Raises:
        ValueError: if the model has no ``build_config``, ``extra`` is not JSON-serialisable,
            the model type is unknown, or ``state_dict`` lacks a key to save.
    """
    build_config = getattr(model, "build_config", None)
    if not build_config or "builder" not in build_config:
        raise ValueError(
            "Invalid model: it has no build_config, so a checkpoint could not rebuild it. Build the "
            f"model with a {BUILDER_PACKAGE} builder such as mol_smollm2_135m."
        )
    extra = dict(extra or {})
    base_checkpoint_dir = base_checkpoint_dir or extra.get("base_checkpoint_dir")
    base_model_type = base_model_type or extra.get("base_model_type") or infer_model_type(build_config["builder"])
    if base_model_type is None or str(base_model_type).upper() not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Invalid base_model_type: {base_model_type!r} for builder {build_config['builder']}. "
            f"Pass base_model_type, one of {list(SUPPORTED_MODEL_TYPES)}."
        )

    state = model.state_dict() if state_dict is None else state_dict
    keys = mol_state_keys(model)
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"Invalid state_dict: missing key {missing[0]!r} ({len(missing)} missing in all).")
    tensors = {key: state[key].detach().to("cpu").contiguous() for key in keys}

    save_id = uuid.uuid4().hex
    config = {
        "format_version": FORMAT_VERSION,
        "build_config": build_config,
        "layout": model.layout.to_dict(),
        "layout_fingerprint": model.layout.fingerprint(),
        "base_checkpoint_dir": str(Path(base_checkpoint_dir).resolve()) if base_checkpoint_dir else None,
        "base_model_type": str(base_model_type).upper(),
        "dtype": str(_parameter_dtype(model)).removeprefix("torch."),
        "step": step,
        "saved_keys": keys,
        "extra": extra,
        _SAVE_ID_KEY: save_id,
    }
    try:
        config_text = json.dumps(config, indent=2) + "\n"
    except TypeError as error:
        raise ValueError(f"Invalid checkpoint metadata: {error}. Pass JSON-serialisable values in extra.") from None

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path = output_dir / ADAPTER_FILE
    config_path = output_dir / CONFIG_FILE
    weights_temp = output_dir / f".{ADAPTER_FILE}.tmp-{save_id}"
    config_temp = output_dir / f".{CONFIG_FILE}.tmp-{save_id}"
    try:
        save_file(tensors, str(weights_temp), metadata={"format": "pt", _SAVE_ID_KEY: save_id})
        _fsync(weights_temp)
        config_temp.write_text(config_text)
        _fsync(config_temp)
        os.replace(weights_temp, weights_path)
        os.replace(config_temp, config_path)
    finally:
        weights_temp.unlink(missing_ok=True)
        config_temp.unlink(missing_ok=True)
    logger.info("Saved %d MoL tensors to %s", len(tensors), output_dir)
    return output_dir


def read_mol_config(checkpoint_dir: Union[str, Path]) -> Dict[str, Any]:
    """Read and check ``mol_config.json`` of a MoL checkpoint folder.

    Raises:
        FileNotFoundError: if the folder or its ``mol_config.json`` or ``adapter_model.safetensors``
            is missing.
        ValueError: if the config is not valid JSON or has an unknown format version.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / CONFIG_FILE
    for path in (config_path, checkpoint_dir / ADAPTER_FILE):
        if not path.is_file():
            raise FileNotFoundError(
                f"Missing {path.name} in {checkpoint_dir}: not a MoL checkpoint folder. Point at a folder "
                "written by save_mol_checkpoint (for example a run's step_<N> folder)."
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Invalid {config_path}: {error}.") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Invalid format_version {version!r} in {config_path}: this mol_tune reads version "
            f"{FORMAT_VERSION}. Load it with the mol_tune version that wrote it."
        )
    return config


def load_mol_state(model: nn.Module, checkpoint_dir: Union[str, Path]) -> Dict[str, Any]:
    """Load a MoL checkpoint's saved state into ``model``, strictly.

    Every saved key must exist in the model with the same shape, and every key that the model
    would save (``mol_state_keys``) must be in the checkpoint. The base weights are not touched.

    Args:
        model (nn.Module): a MoL model with the checkpoint's vocabulary layout.
        checkpoint_dir (Union[str, Path]): folder written by ``save_mol_checkpoint``.

    Returns:
        Dict[str, Any]: the checkpoint's ``mol_config.json``.

    Raises:
        ValueError: if the layout differs, the two files come from different saves, or a key is
            missing, unexpected or of the wrong shape.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = read_mol_config(checkpoint_dir)
    layout = model.layout.to_dict()
    if layout != config["layout"]:
        raise ValueError(
            f"Invalid model for checkpoint {checkpoint_dir}: its vocabulary layout {layout} differs from "
            f"the saved layout {config['layout']}. Build the model with the checkpoint's modalities."
        )

    weights_path = checkpoint_dir / ADAPTER_FILE
    with safe_open(str(weights_path), framework="pt") as weights:
        file_save_id = (weights.metadata() or {}).get(_SAVE_ID_KEY)
        if file_save_id != config.get(_SAVE_ID_KEY):
            raise ValueError(
                f"Inconsistent checkpoint {checkpoint_dir}: {ADAPTER_FILE} and {CONFIG_FILE} come from "
                "different saves, so the last save was interrupted. Use an earlier checkpoint or save again."
            )
        saved = {key: weights.get_tensor(key) for key in weights.keys()}

    model_state = model.state_dict()
    for key, tensor in saved.items():
        if key not in model_state:
            raise ValueError(
                f"Unexpected key {key!r} in {weights_path}: the model has no such parameter or buffer. "
                "Build the model with the checkpoint's builder arguments (see build_config in "
                f"{CONFIG_FILE})."
            )
        if tuple(tensor.shape) != tuple(model_state[key].shape):
            raise ValueError(
                f"Invalid shape of {key!r} in {weights_path}: {tuple(tensor.shape)}, the model expects "
                f"{tuple(model_state[key].shape)}. Build the model with the checkpoint's builder arguments."
            )
    for key in mol_state_keys(model):
        if key not in saved:
            raise ValueError(
                f"Missing key {key!r} in {weights_path}: the model trains it but the checkpoint does not "
                "contain it. Build the model with the checkpoint's builder arguments."
            )

    model.load_state_dict(saved, strict=False)
    return config


def load_mol_model(
    checkpoint_dir: Union[str, Path],
    base_checkpoint_dir: Optional[Union[str, Path]] = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Rebuild a MoL model from a checkpoint folder and its base weights.

    The builder named in ``mol_config.json`` is called with the recorded arguments under the
    recorded dtype, the base weights are loaded with ``model.load_base_state_dict``, and then
    the saved MoL state is loaded with ``load_mol_state``. The model is returned in training
    mode, as the builder makes it; call ``eval()`` for inference.

    Args:
        checkpoint_dir (Union[str, Path]): folder written by ``save_mol_checkpoint``.
        base_checkpoint_dir (Optional[Union[str, Path]]): Hugging Face folder of the base weights.
            Default: the folder recorded in the checkpoint.
        device (Optional[Union[str, torch.device]]): device to build the model on. Default: the
            current default device.

    Returns:
        nn.Module: the MoL model, with ``build_config`` set.

    Raises:
        FileNotFoundError: if the checkpoint or base folder is missing.
        ValueError: if the builder is not a ``mol_tune.models`` builder, no base folder is known,
            or the saved state does not fit the rebuilt model.
    """
    from torchtune import training

    checkpoint_dir = Path(checkpoint_dir)
    config = read_mol_config(checkpoint_dir)
    builder = _import_builder(config["build_config"]["builder"], checkpoint_dir)
    base_dir = base_checkpoint_dir or config.get("base_checkpoint_dir")
    if not base_dir:
        raise ValueError(
            f"Missing base checkpoint folder for {checkpoint_dir}: none is recorded in {CONFIG_FILE}. "
            "Pass base_checkpoint_dir."
        )
    dtype = getattr(torch, str(config.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Invalid dtype {config.get('dtype')!r} in {checkpoint_dir / CONFIG_FILE}.")
    device_context = torch.device(device) if device is not None else contextlib.nullcontext()

    with training.set_default_dtype(dtype), device_context:
        model = builder(**config["build_config"]["kwargs"])
    if base_checkpoint_dir is None and not Path(base_dir).is_dir():
        raise FileNotFoundError(
            f"Base checkpoint folder {base_dir}, recorded in {checkpoint_dir / CONFIG_FILE}, not found. "
            "Pass base_checkpoint_dir= with the folder of the same base model on this machine."
        )
    model.load_base_state_dict(load_base_state_dict(base_dir, config["base_model_type"]))
    load_mol_state(model, checkpoint_dir)
    model.build_config = config["build_config"]
    return model


def _import_builder(name: str, checkpoint_dir: Path):
    # Only builders of this package are imported: a checkpoint folder must not be able to
    # make the loader import arbitrary modules.
    import mol_tune.models

    package, _, attribute = name.rpartition(".")
    builder = getattr(mol_tune.models, attribute, None) if package == BUILDER_PACKAGE else None
    if not callable(builder):
        raise ValueError(
            f"Invalid builder {name!r} in {checkpoint_dir / CONFIG_FILE}: expected a {BUILDER_PACKAGE} "
            f"builder, one of {mol_tune.models.__all__}."
        )
    return builder


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.get_default_dtype()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
