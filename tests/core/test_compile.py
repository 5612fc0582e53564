"""torch.compile of the DiT blocks: compiled equals eager, and every fallback is clean.

Inductor needs about two minutes on this CPU for even a tiny config, so the compiled path is
tested with the ``"eager"`` backend (TorchDynamo traces the blocks into graphs that run the same
kernels); the fallbacks are tested with a backend that fails and with an unknown backend name.
"""

from __future__ import annotations

import logging

import pytest
import torch

from mochi_core import compile as dit_compile
from mochi_core.demo import DemoDiTSize, random_dit_state_dict
from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.offload import offload_blocks

SIZE = DemoDiTSize(depth=2, hidden_x=32, hidden_y=32, heads=2, mlp_x=64, mlp_y=64, t5_dim=16)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_dit() -> AsymmDiT:
    sd = random_dit_state_dict(0, SIZE)
    model = AsymmDiT(DiTConfig.from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


def inputs(frames: int = 2, tokens: int = 5):
    gen = torch.Generator().manual_seed(frames)
    x = torch.randn(1, 12, frames, 4, 6, generator=gen)
    mask = torch.arange(12)[None] < tokens
    return x, torch.tensor([0.7]), torch.randn(1, 12, 16, generator=gen), mask


def run(model, *args):
    with torch.no_grad():
        return model(*args)


def test_compiled_blocks_equal_eager_across_token_counts():
    model = make_dit()
    cases = [inputs(2, 5), inputs(3, 9)]  # a new token count and text length: no fallback
    expected = [run(model, *case) for case in cases]
    keys = list(model.state_dict())
    handle = dit_compile.compile_blocks(model, backend="eager")
    assert handle.active and list(model.state_dict()) == keys
    for case, want in zip(cases, expected, strict=True):
        assert torch.equal(run(model, *case), want)  # the same kernels, traced
    assert handle.active, handle.reason
    handle.remove()
    assert all("forward" not in block.__dict__ for block in model.blocks)


def test_compile_failure_at_first_call_falls_back_to_eager(caplog):
    calls = []

    def failing_backend(graph_module, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler here")

    model = make_dit()
    expected = run(model, *inputs())
    handle = dit_compile.compile_blocks(model, backend=failing_backend)
    assert handle.active
    with caplog.at_level(logging.WARNING, logger="mochi_core.compile"):
        out = run(model, *inputs())
        again = run(model, *inputs(3, 9))
    assert torch.equal(out, expected)
    assert again.shape == (1, 12, 3, 4, 6)
    assert not handle.active and "no C++ compiler here" in handle.reason
    assert len(calls) == 1  # one failure switches every block to eager for good
    assert sum("running them eagerly" in r.message for r in caplog.records) == 1


def test_unknown_backend_is_not_installed(caplog):
    model = make_dit()
    with caplog.at_level(logging.WARNING, logger="mochi_core.compile"):
        handle = dit_compile.compile_blocks(model, backend="no-such-backend")
    assert not handle.active and "unknown torch.compile backend" in handle.reason
    assert "not compiling" in caplog.text
    assert all("forward" not in block.__dict__ for block in model.blocks)


def test_out_of_memory_is_not_taken_for_a_compile_failure():
    model = make_dit()
    handle = dit_compile.compile_blocks(model, backend="eager")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    model.blocks[0].forward.compiled = oom
    with pytest.raises(torch.OutOfMemoryError):
        run(model, *inputs())
    assert handle.active


def test_compiled_blocks_under_offload_hooks_equal_eager():
    model = make_dit()
    expected = run(model, *inputs())
    compiled = dit_compile.compile_blocks(model, backend="eager")
    offload = offload_blocks(model, resident=1, device="cpu")
    assert torch.equal(run(model, *inputs()), expected)
    assert compiled.active and offload.stats.max_resident == 1
    offload.remove()
    compiled.remove()


DEEP = DemoDiTSize(depth=10, hidden_x=32, hidden_y=32, heads=2, mlp_x=64, mlp_y=64, t5_dim=16)


def test_inductor_compiles_ten_blocks_to_two_graphs():
    """All full blocks share one inductor graph and the last block has its own: no graph break
    (the complex RoPE used to split every block), and a second token count and text length
    reuse them (only the token dimensions are dynamic, so no recompile per block)."""
    from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

    graphs = []

    def counting_inductor(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    sd = random_dit_state_dict(0, DEEP)
    model = AsymmDiT(DiTConfig.from_state_dict(sd))
    model.load_state_dict(sd)
    model.eval()
    cases = [inputs(2, 5), inputs(3, 9)]
    expected = [run(model, *case) for case in cases]
    handle = dit_compile.compile_blocks(model, backend=counting_inductor)
    outs = [run(model, *case) for case in cases]
    assert handle.active, handle.reason
    assert len(graphs) <= 2, f"{len(graphs)} graphs"
    for out, want in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
