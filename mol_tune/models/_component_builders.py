"""Component builders: assemble MoL decoders for the Llama 3.2 and Qwen 2 architectures.

The structure lives here; the numbers of each published model live in ``_model_builders``.
"""

from typing import Any, Callable, List, Optional, Sequence

from torch import nn

from torchtune.models.llama3._model_utils import scale_hidden_dim_for_mlp
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import RMSNorm

from mol_tune.modules.attention import MoLMultiHeadAttention
from mol_tune.modules.embedding import MultimodalEmbedding, TiedMultimodalHead
from mol_tune.modules.mol_linear import SHARED, MoLLinear
from mol_tune.modules.norm import ModalityRMSNorm
from mol_tune.modules.transformer import MoLFeedForward, MoLTransformerDecoder, MoLTransformerLayer
from mol_tune.vocab import VocabularyLayout, as_modality

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj")
ADAPTER_MODES = ("per_modality", "shared")


def mol_decoder(
    *,
    modalities: Sequence[Any],
    base_vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    make_rope: Callable[[int], nn.Module],
    qkv_bias: bool = False,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    adapter_mode: str = "per_modality",
    adapter_modalities: Optional[Sequence[str]] = None,
    lora_attn_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    apply_lora_to_mlp: bool = False,
    per_modality_norms: bool = True,
    embedding_training: str = "all",
) -> MoLTransformerDecoder:
    """Build a MoL decoder: a frozen pretrained decoder with per-modality adapters and norms.

    Args:
        modalities (Sequence[Any]): non-text modalities as ``Modality`` or dicts with
            ``name``, ``num_codes``, ``codebook_dim``; their codes and delimiters extend the vocabulary.
        base_vocab_size (int): vocabulary size of the pretrained model.
        num_layers (int): number of decoder layers.
        num_heads (int): number of query heads.
        num_kv_heads (int): number of key/value heads (grouped-query attention).
        embed_dim (int): model width.
        intermediate_dim (int): hidden width of the SwiGLU MLP.
        max_seq_len (int): maximum sequence length, for RoPE tables and KV-caches.
        make_rope (Callable[[int], nn.Module]): builds the rotary embedding for a head dimension.
        qkv_bias (bool): whether q, k and v have a bias (Qwen 2). Default: False.
        norm_eps (float): RMSNorm epsilon. Default: 1e-5.
        attn_dropout (float): attention dropout. Default: 0.0.
        lora_rank (int): LoRA rank ``r``. Default: 8.
        lora_alpha (float): LoRA ``alpha``; adapters are scaled by ``alpha / r``. Default: 16.0.
        lora_dropout (float): dropout on adapter inputs. Default: 0.0.
        adapter_mode (str): ``"per_modality"`` (MoL) or ``"shared"`` (one LoRA for every token,
            the baseline). Default: ``"per_modality"``.
        adapter_modalities (Optional[Sequence[str]]): modalities that get adapters in
            per-modality mode; the others use the frozen weights alone. Default: all, text included.
        lora_attn_modules (Sequence[str]): attention projections that get adapters, a subset of
            ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``. Default: all four.
        apply_lora_to_mlp (bool): also put adapters on the MLP projections. Default: False.
        per_modality_norms (bool): give each modality its own trainable RMSNorm before attention
            and before the MLP; when False the pretrained norms stay shared and frozen. Default: True.
        embedding_training (str): ``"all"`` (the whole table trains), ``"new"`` (only appended
            rows and projections) or ``"none"``. Default: ``"all"``.

    Returns:
        MoLTransformerDecoder: the model, with only adapters, norms and embeddings (per
        ``embedding_training``) trainable. Pretrained weights still need ``load_base_state_dict``.

    Raises:
        ValueError: on an unknown adapter mode, attention projection or modality.
    """
    layout = VocabularyLayout(base_vocab_size, tuple(as_modality(m) for m in modalities))
    names = layout.modality_names
    if adapter_mode not in ADAPTER_MODES:
        raise ValueError(f"Invalid adapter_mode: {adapter_mode!r}. Use one of {ADAPTER_MODES}.")
    unknown_projections = [p for p in lora_attn_modules if p not in ATTENTION_PROJECTIONS]
    if unknown_projections:
        raise ValueError(f"Invalid lora_attn_modules: {unknown_projections}. Choose from {ATTENTION_PROJECTIONS}.")
    if adapter_mode == "shared":
        if adapter_modalities is not None:
            raise ValueError(
                f"Invalid adapter_modalities: {list(adapter_modalities)} with adapter_mode 'shared'. The shared "
                "adapter serves every token; remove adapter_modalities or use adapter_mode 'per_modality'."
            )
        adapters: List[str] = [SHARED]
    else:
        adapters = list(names if adapter_modalities is None else adapter_modalities)
        unknown = [m for m in adapters if m not in names]
        if unknown:
            raise ValueError(f"Invalid adapter_modalities: {unknown}. This model has the modalities {names}.")

    def projection(in_dim: int, out_dim: int, with_adapters: bool, bias: bool = False) -> MoLLinear:
        return MoLLinear(
            in_dim,
            out_dim,
            modality_names=names,
            adapter_modalities=adapters if with_adapters else [],
            rank=lora_rank,
            alpha=lora_alpha,
            dropout=lora_dropout,
            use_bias=bias,
        )

    def norm() -> nn.Module:
        if per_modality_norms:
            return ModalityRMSNorm(embed_dim, names, eps=norm_eps)
        return RMSNorm(embed_dim, eps=norm_eps)

    head_dim = embed_dim // num_heads
    rope = make_rope(head_dim)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MoLMultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=projection(embed_dim, num_heads * head_dim, "q_proj" in lora_attn_modules, qkv_bias),
            k_proj=projection(embed_dim, num_kv_heads * head_dim, "k_proj" in lora_attn_modules, qkv_bias),
            v_proj=projection(embed_dim, num_kv_heads * head_dim, "v_proj" in lora_attn_modules, qkv_bias),
            output_proj=projection(embed_dim, embed_dim, "output_proj" in lora_attn_modules),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        mlp = MoLFeedForward(
            gate_proj=projection(embed_dim, intermediate_dim, apply_lora_to_mlp),
            down_proj=projection(intermediate_dim, embed_dim, apply_lora_to_mlp),
            up_proj=projection(embed_dim, intermediate_dim, apply_lora_to_mlp),
        )
        layers.append(MoLTransformerLayer(attn=attn, mlp=mlp, sa_norm=norm(), mlp_norm=norm()))

    tok_embeddings = MultimodalEmbedding(layout, embed_dim)
    model = MoLTransformerDecoder(
        layout=layout,
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=TiedMultimodalHead(tok_embeddings),
    )
    model.set_trainable(embedding_training)
    return model


def mol_llama3_2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    rope_base: float = 500_000,
    scale_factor: float = 32,
    norm_eps: float = 1e-5,
    **mol_kwargs: Any,
) -> MoLTransformerDecoder:
    """Build a MoL decoder on the Llama 3.2 architecture (torchtune's ``llama3_2`` with tied embeddings).

    Args:
        vocab_size (int): base (text) vocabulary size.
        num_layers (int): number of layers.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads.
        embed_dim (int): model width.
        max_seq_len (int): maximum sequence length.
        intermediate_dim (Optional[int]): MLP width; torchtune's Llama 3 rule when None.
        rope_base (float): RoPE base. Default: 500_000.
        scale_factor (float): Llama 3 RoPE scaling factor; 1 disables scaling (SmolLM2). Default: 32.
        norm_eps (float): RMSNorm epsilon. Default: 1e-5.
        **mol_kwargs: modalities and adapter settings, see ``mol_decoder``.

    Returns:
        MoLTransformerDecoder: the model.
    """
    return mol_decoder(
        base_vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim or scale_hidden_dim_for_mlp(embed_dim),
        max_seq_len=max_seq_len,
        make_rope=lambda head_dim: Llama3ScaledRoPE(
            dim=head_dim, max_seq_len=max_seq_len, base=rope_base, scale_factor=scale_factor
        ),
        norm_eps=norm_eps,
        **mol_kwargs,
    )


def mol_qwen2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: float = 1_000_000.0,
    norm_eps: float = 1e-6,
    **mol_kwargs: Any,
) -> MoLTransformerDecoder:
    """Build a MoL decoder on the Qwen 2 architecture (bias on q, k, v; tied embeddings).

    Args:
        vocab_size (int): base (text) vocabulary size.
        num_layers (int): number of layers.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads.
        embed_dim (int): model width.
        intermediate_dim (int): MLP width.
        max_seq_len (int): maximum sequence length.
        rope_base (float): RoPE base. Default: 1_000_000.0.
        norm_eps (float): RMSNorm epsilon. Default: 1e-6.
        **mol_kwargs: modalities and adapter settings, see ``mol_decoder``.

    Returns:
        MoLTransformerDecoder: the model.
    """
    return mol_decoder(
        base_vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        make_rope=lambda head_dim: Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base),
        qkv_bias=True,
        norm_eps=norm_eps,
        **mol_kwargs,
    )
