"""MoL on the real SmolLM2-135M-Instruct weights against the unmodified torchtune model."""

import pytest
import torch

from torchtune.models.llama3_2 import llama3_2

from mol_tune.checkpointing.base import load_base_state_dict
from mol_tune.checkpointing.convert_gguf import prepare_default_model
from mol_tune.models import mol_smollm2_135m

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model_dir = prepare_default_model()
    state = load_base_state_dict(model_dir, "LLAMA3_2")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return state, tokenizer


def test_zero_adapters_match_smollm2(smollm2):
    state, tokenizer = smollm2
    base = llama3_2(
        vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576, max_seq_len=256,
        intermediate_dim=1536, rope_base=100_000, scale_factor=1, norm_eps=1e-5,
    )
    base.load_state_dict(state)
    model = mol_smollm2_135m(modalities=[{"name": "image", "num_codes": 128, "codebook_dim": 4}], max_seq_len=256)
    model.load_base_state_dict(state)
    base.eval()
    model.eval()

    sentences = ["The capital of France is Paris, and", "A handwritten digit seven looks like"]
    ids = [tokenizer.encode(s).ids[:6] for s in sentences]
    tokens = torch.tensor(ids)
    with torch.no_grad():
        expected = base(tokens)
        logits = model(tokens)
    torch.testing.assert_close(logits[..., :49152], expected, rtol=1e-5, atol=1e-5)
    # Real weights give a confident next token, unlike a random initialisation.
    assert expected[0, -1].softmax(-1).max() > 0.05
