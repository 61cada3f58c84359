"""torch.compile on the MoL model: routing must not force a recompile per sequence length."""

import torch
from torch._dynamo.testing import CompileCounter

from conftest import randomize_adapters, tiny_llama_pair


def test_no_recompile_for_new_lengths():
    torch._dynamo.reset()
    _, model = tiny_llama_pair()
    randomize_adapters(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    layout = model.layout

    def run(seq_len):
        tokens = torch.randint(0, layout.vocab_size, (2, seq_len))
        out = compiled(tokens)
        torch.testing.assert_close(out, model(tokens), rtol=1e-5, atol=1e-5)

    # The first length compiles static shapes, the second marks the length dynamic.
    run(8)
    run(12)
    frames_after_warmup = counter.frame_count
    for seq_len in (16, 20, 27, 33):
        run(seq_len)
    assert counter.frame_count == frames_after_warmup
