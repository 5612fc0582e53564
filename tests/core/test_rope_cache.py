"""The DiT's RoPE rotation cache (issue 12, item 3): built once per sampling run, rebuilt when its
inputs change by value, never cached where it cannot be compared, and dropped when a run ends."""

from __future__ import annotations

import pytest
import torch

from mochi_core import dit as dit_module
from mochi_core import sampling
from mochi_core.dit import AsymmDiT, DiTConfig, RopeCache, rope_positions, rope_rotation
from mochi_core.text import TextConditioning
from tests.oracles import random_dit_state_dict

TINY = DiTConfig(depth=2, hidden_size_x=96, hidden_size_y=64, num_heads=2, mlp_hidden_x=256,
                 mlp_hidden_y=160, t5_feat_dim=64)  # fmt: skip


@pytest.fixture
def builds(monkeypatch):
    """Counts the rotations built (the cache's misses)."""
    calls = []

    def counting(freqs, positions):
        calls.append(tuple(positions.shape))
        return rope_rotation(freqs, positions)

    monkeypatch.setattr(dit_module, "rope_rotation", counting)
    return calls


def frequencies(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(seed))


def test_a_hit_needs_equal_values_and_positions(builds):
    cache, freqs, pos = RopeCache(), frequencies(), rope_positions(2, 4, 6)
    first = cache.get(freqs, pos)
    assert cache.get(freqs.clone(), pos.clone()) is first  # equal values, other tensors
    assert builds == [(48, 3)]
    freqs[0, 0, 0] += 1e-3  # an in-place edit (a LoRA patch on the frequencies)
    edited = cache.get(freqs, pos)
    assert edited is not first and torch.equal(edited, rope_rotation(freqs, pos))
    other = rope_positions(2, 4, 6, offset_thw=(0, 0, 2), canvas_hw=(4, 8))  # another tile
    assert torch.equal(cache.get(freqs, other), rope_rotation(freqs, other))
    assert torch.equal(cache.get(freqs.double(), other), rope_rotation(freqs.double(), other))
    assert len(builds) == 4, "a dtype change must rebuild too"


def test_meta_and_autograd_inputs_are_never_cached(builds):
    cache, pos = RopeCache(), rope_positions(1, 2, 2)
    meta = frequencies().to("meta")
    cache.get(meta, pos.to("meta"))
    cache.get(meta, pos.to("meta"))
    tracked = frequencies().requires_grad_()
    out = cache.get(tracked, pos)
    assert out.requires_grad and cache.get(tracked, pos) is not out
    assert len(builds) == 4 and cache._rotation is None


def model() -> AsymmDiT:
    m = AsymmDiT(TINY)
    m.load_state_dict(random_dit_state_dict(TINY, torch.Generator().manual_seed(0)))
    return m.eval()


def cond(length: int, seed: int) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 8, TINY.t5_feat_dim, generator=g)
    return TextConditioning(features, torch.arange(8)[None] < length)


@pytest.mark.parametrize("cancel", [False, True])
def test_a_run_builds_one_rotation_and_drops_it_at_the_end(builds, cancel):
    """Four steps with CFG in two passes: one rotation for all eight forwards, the same
    latents as without the cache, and nothing held once the run ends or is cancelled."""
    m = model()
    held = []

    def callback(step, total, x0):
        held.append(m.rope_cache._rotation is not None)
        if cancel and step == 2:
            raise KeyboardInterrupt

    kwargs = dict(latents_or_shape=(1, 12, 2, 4, 6), positive=cond(5, 1), negative=cond(0, 2),
                  sigmas=[1.0, 0.75, 0.5, 0.25, 0.0], cfg=4.5, batch_cfg=False)  # fmt: skip
    if cancel:
        with pytest.raises(KeyboardInterrupt):
            sampling.sample(m, generator=torch.Generator().manual_seed(0), callback=callback,
                            **kwargs)  # fmt: skip
        assert held == [True, True]
    else:
        z = sampling.sample(m, generator=torch.Generator().manual_seed(0), callback=callback,
                            **kwargs)  # fmt: skip
        assert held == [True] * 4 and builds == [(12, 3)]  # 2 x 2 x 3 patches
        uncached = model()
        uncached.rope_cache.get = lambda f, p: rope_rotation(f, p)  # a miss every forward
        again = sampling.sample(uncached, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(z, again)
    assert m.rope_cache._rotation is None and m.rope_cache._key is None
