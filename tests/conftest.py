"""Shared fixtures: tiny MoL models next to the unmodified torchtune models they extend."""

import pytest
import torch

from torchtune.models.llama3_2 import llama3_2
from torchtune.models.qwen2 import qwen2

from mol_tune.models import mol_llama3_2, mol_qwen2

IMAGE_SPEECH = [
    {"name": "image", "num_codes": 12, "codebook_dim": 4},
    {"name": "speech", "num_codes": 6, "codebook_dim": 3},
]
TINY_LLAMA = dict(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64,
                  intermediate_dim=48, rope_base=10_000, norm_eps=1e-5)
TINY_QWEN = dict(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64,
                 intermediate_dim=48, rope_base=10_000.0, norm_eps=1e-6)


def tiny_llama_pair(seed: int = 0, **mol_kwargs):
    """Return a random torchtune Llama 3.2 and a MoL model loaded from its weights."""
    torch.manual_seed(seed)
    base = llama3_2(**TINY_LLAMA, scale_factor=1)
    mol_kwargs.setdefault("modalities", IMAGE_SPEECH)
    model = mol_llama3_2(**TINY_LLAMA, scale_factor=1, lora_rank=4, lora_alpha=8.0, **mol_kwargs)
    model.load_base_state_dict(base.state_dict())
    for name, m in IMAGE_SPEECH_BY_NAME.items():
        if name in model.layout.modality_names:
            model.tok_embeddings.set_codebook(name, torch.randn(m["num_codes"], m["codebook_dim"]))
    model.tok_embeddings.initialize_new_embeddings(torch.Generator().manual_seed(seed))
    return base, model


def tiny_qwen_pair(seed: int = 0, **mol_kwargs):
    """Return a random torchtune Qwen 2 (tied) and a MoL model loaded from its weights."""
    torch.manual_seed(seed)
    base = qwen2(**TINY_QWEN, tie_word_embeddings=True)
    mol_kwargs.setdefault("modalities", IMAGE_SPEECH)
    model = mol_qwen2(**TINY_QWEN, lora_rank=4, lora_alpha=8.0, **mol_kwargs)
    model.load_base_state_dict(base.state_dict())
    return base, model


IMAGE_SPEECH_BY_NAME = {m["name"]: m for m in IMAGE_SPEECH}


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every LoRA B a nonzero value, so adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_b." in name or ".lora_a." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def mixed_tokens(layout, batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Random sequences that mix text ids, image and speech codes and delimiters."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, layout.vocab_size, (batch_size, seq_len), generator=generator)


@pytest.fixture
def llama_pair():
    return tiny_llama_pair()
