"""Model builders: MoL versions of published models, with the adapter settings used for each.

Each builder takes the non-text modalities (``name``, ``num_codes``, ``codebook_dim``) and any
``mol_decoder`` setting as keyword arguments, and records its own name and arguments in
``model.build_config`` so a saved checkpoint can rebuild the model without the training config.
"""

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

from mol_tune.models._component_builders import mol_llama3_2, mol_qwen2
from mol_tune.modules.transformer import MoLTransformerDecoder
from mol_tune.vocab import as_modality

# A VQ image tokenizer with 8192 codes of dimension 256 and a speech unit model with 256 units.
DEFAULT_MODALITIES: List[Dict[str, Any]] = [
    {"name": "image", "num_codes": 8192, "codebook_dim": 256},
    {"name": "speech", "num_codes": 256, "codebook_dim": 256},
]


def _json_ready(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_json_ready(v) for v in value]
    if isinstance(value, dict) or type(value).__name__ == "DictConfig":
        return {str(k): _json_ready(v) for k, v in dict(value).items()}
    if hasattr(value, "__dataclass_fields__"):
        return _json_ready(vars(value))
    return value


def records_build_config(builder: Callable[..., MoLTransformerDecoder]) -> Callable[..., MoLTransformerDecoder]:
    """Store the builder's import path and its bound arguments in ``model.build_config``."""
    signature = inspect.signature(builder)

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> MoLTransformerDecoder:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("mol_kwargs", {}))
        arguments["modalities"] = [vars(as_modality(m)) for m in _modalities(arguments["modalities"])]
        model = builder(*args, **kwargs)
        model.build_config = {"builder": f"{builder.__module__.rsplit('.', 1)[0]}.{builder.__name__}", "kwargs": _json_ready(arguments)}
        return model

    return wrapper


def _modalities(modalities: Optional[Sequence[Any]]) -> List[Any]:
    return list(DEFAULT_MODALITIES if modalities is None else modalities)


@records_build_config
def mol_llama3_2_1b(
    modalities: Optional[Sequence[Any]] = None,
    lora_rank: int = 64,
    lora_alpha: float = 64.0,
    max_seq_len: int = 2048,
    **mol_kwargs: Any,
) -> MoLTransformerDecoder:
    """MoL Llama 3.2 1B: 16 layers, width 2048, 32 query and 8 key/value heads, vocabulary 128,256.

    Args:
        modalities (Optional[Sequence[Any]]): non-text modalities. Default: image (8192 codes of
            dimension 256) and speech (256 units).
        lora_rank (int): Default: 64.
        lora_alpha (float): Default: 64.
        max_seq_len (int): training context. Default: 2048.
        **mol_kwargs: other ``mol_decoder`` settings (adapter_mode, lora_attn_modules, ...).

    Returns:
        MoLTransformerDecoder: the model.
    """
    return mol_llama3_2(
        vocab_size=128_256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
        intermediate_dim=8192, max_seq_len=max_seq_len, rope_base=500_000, scale_factor=32, norm_eps=1e-5,
        modalities=_modalities(modalities), lora_rank=lora_rank, lora_alpha=lora_alpha, **mol_kwargs,
    )


@records_build_config
def mol_llama3_2_3b(
    modalities: Optional[Sequence[Any]] = None,
    lora_rank: int = 64,
    lora_alpha: float = 64.0,
    max_seq_len: int = 2048,
    **mol_kwargs: Any,
) -> MoLTransformerDecoder:
    """MoL Llama 3.2 3B: 28 layers, width 3072, 24 query and 8 key/value heads, vocabulary 128,256.

    Args:
        modalities (Optional[Sequence[Any]]): non-text modalities. Default: image and speech.
        lora_rank (int): Default: 64.
        lora_alpha (float): Default: 64.
        max_seq_len (int): training context. Default: 2048.
        **mol_kwargs: other ``mol_decoder`` settings.

    Returns:
        MoLTransformerDecoder: the model.
    """
    return mol_llama3_2(
        vocab_size=128_256, num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072,
        intermediate_dim=8192, max_seq_len=max_seq_len, rope_base=500_000, scale_factor=32, norm_eps=1e-5,
        modalities=_modalities(modalities), lora_rank=lora_rank, lora_alpha=lora_alpha, **mol_kwargs,
    )


@records_build_config
def mol_qwen2_0_5b(
    modalities: Optional[Sequence[Any]] = None,
    lora_rank: int = 16,
    lora_alpha: float = 16.0,
    max_seq_len: int = 2048,
    **mol_kwargs: Any,
) -> MoLTransformerDecoder:
    """MoL Qwen 2 0.5B: 24 layers, width 896, 14 query and 2 key/value heads, vocabulary 151,936.

    Args:
        modalities (Optional[Sequence[Any]]): non-text modalities. Default: image and speech.
        lora_rank (int): Default: 16.
        lora_alpha (float): Default: 16.
        max_seq_len (int): training context. Default: 2048.
        **mol_kwargs: other ``mol_decoder`` settings.

    Returns:
        MoLTransformerDecoder: the model.
    """
    return mol_qwen2(
        vocab_size=151_936, num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896,
        intermediate_dim=4864, max_seq_len=max_seq_len, rope_base=1_000_000.0, norm_eps=1e-6,
        modalities=_modalities(modalities), lora_rank=lora_rank, lora_alpha=lora_alpha, **mol_kwargs,
    )


@records_build_config
def mol_smollm2_135m(
    modalities: Optional[Sequence[Any]] = None,
    lora_rank: int = 16,
    lora_alpha: float = 16.0,
    max_seq_len: int = 2048,
    **mol_kwargs: Any,
) -> MoLTransformerDecoder:
    """MoL SmolLM2-135M (Llama architecture): 30 layers, width 576, 9 query and 3 key/value heads,
    MLP width 1536, vocabulary 49,152, RoPE base 100,000 without Llama 3 scaling.

    Args:
        modalities (Optional[Sequence[Any]]): non-text modalities. Default: image and speech.
        lora_rank (int): Default: 16.
        lora_alpha (float): Default: 16.
        max_seq_len (int): training context. Default: 2048.
        **mol_kwargs: other ``mol_decoder`` settings.

    Returns:
        MoLTransformerDecoder: the model.
    """
    return mol_llama3_2(
        vocab_size=49_152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
        intermediate_dim=1536, max_seq_len=max_seq_len, rope_base=100_000, scale_factor=1, norm_eps=1e-5,
        modalities=_modalities(modalities), lora_rank=lora_rank, lora_alpha=lora_alpha, **mol_kwargs,
    )
