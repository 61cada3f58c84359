"""Checkpoints: the default base model, base weights in torchtune format, and MoL checkpoints."""

from mol_tune.checkpointing.base import SUPPORTED_MODEL_TYPES, load_base_state_dict
from mol_tune.checkpointing.convert_gguf import prepare_default_model

__all__ = ["SUPPORTED_MODEL_TYPES", "load_base_state_dict", "prepare_default_model"]
