"""Checkpoints: the default base model, base weights in torchtune format, and MoL checkpoints."""

from mol_tune.checkpointing.base import SUPPORTED_MODEL_TYPES, load_base_state_dict
from mol_tune.checkpointing.mol_checkpoint import (
    load_mol_model,
    load_mol_state,
    mol_state_keys,
    read_mol_config,
    save_mol_checkpoint,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "load_base_state_dict",
    "load_mol_model",
    "load_mol_state",
    "mol_state_keys",
    "prepare_default_model",
    "read_mol_config",
    "save_mol_checkpoint",
]


def __getattr__(name):
    # Imported on first use so that `python -m mol_tune.checkpointing.convert_gguf` does not
    # find its own module already imported by the package (runpy warns about that).
    if name == "prepare_default_model":
        from mol_tune.checkpointing.convert_gguf import prepare_default_model

        return prepare_default_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
