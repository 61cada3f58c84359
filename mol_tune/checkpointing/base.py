"""Load a pretrained base model's weights from a Hugging Face safetensors folder.

Reading goes through torchtune's ``FullModelHFCheckpointer``, so the returned state dict
has torchtune's key names and layouts (for example the permuted q/k projections that
torchtune's RoPE expects), exactly as a stock torchtune recipe would receive it.
"""

import tempfile
from pathlib import Path
from typing import Dict, List, Union

import torch

# torchtune model types whose Hugging Face checkpoints this package reads.
# LLAMA3_2 covers Llama 3.2 and SmolLM2 (same architecture and key names).
SUPPORTED_MODEL_TYPES = ("LLAMA3_2", "QWEN2")

# MoL adapter files that may sit in a model folder but are never base weights.
_ADAPTER_FILES = {"adapter_model.safetensors"}

_PREPARE_HINT = (
    "Run `mol-tune prepare-model` to prepare the default SmolLM2 model, "
    "or pass the folder of a Hugging Face model (for example one from `tune download`)."
)


def find_safetensors_files(checkpoint_dir: Union[str, Path]) -> List[str]:
    """Return the names of the model weight files (``*.safetensors``) in ``checkpoint_dir``, sorted.

    Raises:
        FileNotFoundError: if the folder, its ``config.json`` or its weight files are missing.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Base checkpoint folder not found: {checkpoint_dir}. {_PREPARE_HINT}")
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"Missing config.json in base checkpoint folder {checkpoint_dir}. {_PREPARE_HINT}"
        )
    files = sorted(
        path.name
        for path in checkpoint_dir.glob("*.safetensors")
        if path.is_file() and path.name not in _ADAPTER_FILES
    )
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors weight files in base checkpoint folder {checkpoint_dir}. {_PREPARE_HINT}"
        )
    return files


def load_base_state_dict(checkpoint_dir: Union[str, Path], model_type: str) -> Dict[str, torch.Tensor]:
    """Load a Hugging Face safetensors checkpoint as a torchtune-format state dict.

    The checkpointer requires an output folder even when it only reads. It gets a temporary
    folder outside ``checkpoint_dir``, removed afterwards, so nothing is written into
    ``checkpoint_dir``.

    Args:
        checkpoint_dir (Union[str, Path]): folder with ``config.json`` and ``*.safetensors`` files.
        model_type (str): torchtune model type, one of ``"LLAMA3_2"`` (Llama 3.2, SmolLM2)
            or ``"QWEN2"``.

    Returns:
        Dict[str, torch.Tensor]: the base model state dict with torchtune's key names.

    Raises:
        ValueError: if ``model_type`` is not supported.
        FileNotFoundError: if the folder, ``config.json`` or the weight files are missing.
    """
    model_type = str(model_type).upper()
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Invalid model_type: {model_type!r}. Use one of {list(SUPPORTED_MODEL_TYPES)}.")
    checkpoint_dir = Path(checkpoint_dir)
    files = find_safetensors_files(checkpoint_dir)

    from torchtune import training

    with tempfile.TemporaryDirectory(prefix="mol_tune_base_") as output_dir:
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_files=files,
            model_type=model_type,
            output_dir=output_dir,
        )
        return checkpointer.load_checkpoint()[training.MODEL_KEY]
