"""MoL building blocks: the MoL linear layer, routing, per-modality norms, embeddings, attention and decoder."""

from mol_tune.modules.attention import MoLMultiHeadAttention
from mol_tune.modules.embedding import MultimodalEmbedding, TiedMultimodalHead
from mol_tune.modules.mol_linear import SHARED, MoLLinear
from mol_tune.modules.norm import ModalityRMSNorm
from mol_tune.modules.routing import ModalityRouter
from mol_tune.modules.transformer import MoLFeedForward, MoLTransformerDecoder, MoLTransformerLayer

__all__ = [
    "SHARED",
    "MoLFeedForward",
    "MoLLinear",
    "MoLMultiHeadAttention",
    "MoLTransformerDecoder",
    "MoLTransformerLayer",
    "ModalityRMSNorm",
    "ModalityRouter",
    "MultimodalEmbedding",
    "TiedMultimodalHead",
]
