"""MoL model builders for torchtune configs (``_component_: mol_tune.models.mol_smollm2_135m``)."""

from mol_tune.models._component_builders import mol_decoder, mol_llama3_2, mol_qwen2
from mol_tune.models._model_builders import (
    mol_llama3_2_1b,
    mol_llama3_2_3b,
    mol_qwen2_0_5b,
    mol_smollm2_135m,
)

__all__ = [
    "mol_decoder",
    "mol_llama3_2",
    "mol_qwen2",
    "mol_llama3_2_1b",
    "mol_llama3_2_3b",
    "mol_qwen2_0_5b",
    "mol_smollm2_135m",
]
