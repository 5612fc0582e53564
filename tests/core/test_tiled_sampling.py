"""Tiled DiT sampling: layout on the patch grid, exact blending, one tile = untiled, tile-bounded
token counts, CFG batching per tile, canvas RoPE positions, option validation."""

from __future__ import annotations

import pytest
import torch

from mochi_core.attention import sdpa_attention
from mochi_core.demo import random_dit_state_dict
from mochi_core.dit import AsymmDiT, DiTConfig, rope_positions
from mochi_core.sampling import sample
from mochi_core.schedule import linear_quadratic_schedule
from mochi_core.text import TextConditioning
from mochi_core.tiled_sampling import TiledModel, TileOptions, axis_spans, tile_layout


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def demo_dit(attention=sdpa_attention, local: bool = False) -> AsymmDiT:
    """The 2-block demo DiT; ``local`` ties visual keys to queries (position-sensitive)."""
    sd = random_dit_state_dict(0)
    if local:
        for key in [k for k in sd if k.endswith("attn.qkv_x.weight")]:
            q, _, v = sd[key].chunk(3)
            sd[key] = torch.cat([q, q, v])
    model = AsymmDiT(DiTConfig.from_state_dict(sd), attention=attention)
    model.load_state_dict(sd)
    return model.eval()


def conds() -> tuple[TextConditioning, TextConditioning]:
    feats = torch.randn(1, 256, 64, generator=gen(2))
    positive = TextConditioning(feats, torch.arange(256)[None] < 5)
    negative = TextConditioning(torch.zeros(1, 256, 64), torch.zeros(1, 256, dtype=torch.bool))
    return positive, negative


class Recorder:
    """A position-dependent velocity ``v = 2x + 1`` that records what each call received."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, sigma, y_feat, y_mask, rope_pos=None):
        self.calls.append({"shape": tuple(x.shape), "rope_pos": rope_pos, "batch": x.shape[0]})
        return 2.0 * x + 1.0


# --------------------------------------------------------------------------------------------
# layout and blending


@pytest.mark.parametrize(
    "length, size, overlap",
    [(106, 32, 8), (60, 40, 16), (30, 8, 6), (64, 16, 0), (20, 18, 2), (12, 40, 8)],
)
def test_spans_cover_the_axis_on_the_patch_grid_with_the_overlap(length, size, overlap):
    spans = axis_spans(length, size, overlap, align=2)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == min(size, length) for start, end in spans)
    assert all(start % 2 == 0 for start, _ in spans)
    shared = [a_end - b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)]
    assert all(s >= overlap for s in shared), shared  # never less than asked, never a gap
    assert all(s < size for s in shared)  # every tile adds new positions


@pytest.mark.parametrize(
    "options",
    [TileOptions((8, 12), overlap=4), TileOptions((6, 6), overlap=2, temporal_window=2,
     temporal_overlap=1), TileOptions((4, 8), overlap=0, temporal_window=3)],
)  # fmt: skip
def test_blending_is_a_partition_of_unity(options):
    # v = 2x + 1 is pointwise, so any correct placement and normalization returns it exactly
    x = torch.randn(2, 12, 5, 16, 22, generator=gen(0))
    model = Recorder()
    v = TiledModel(model, options)(x, torch.ones(2), torch.zeros(2, 4, 8), torch.ones(2, 4) > 0)
    torch.testing.assert_close(v, 2.0 * x + 1.0, atol=1e-6, rtol=1e-6)
    assert len(model.calls) == len(tile_layout((5, 16, 22), options)) > 1


def test_feather_ramps_rise_linearly_across_the_overlap():
    tiles = tile_layout((1, 4, 24), TileOptions((10, 16), overlap=8))  # height: one tile
    assert [t.w for t in tiles] == [(0, 16), (8, 24)]
    left = tiles[0].weight[0, 0]
    assert torch.equal(left[:8], torch.ones(8))  # the canvas border is not feathered
    torch.testing.assert_close(left[8:], torch.arange(8, 0, -1) / 9.0)
    torch.testing.assert_close(tiles[1].weight[0, 0, :8], torch.arange(1, 9) / 9.0)


# --------------------------------------------------------------------------------------------
# the real DiT


def test_one_tile_covering_everything_equals_the_untiled_sampler():
    dit = demo_dit()
    positive, negative = conds()
    kwargs = dict(latents_or_shape=(1, 12, 3, 8, 12), positive=positive, negative=negative,
                  sigmas=linear_quadratic_schedule(3), cfg=4.5, batch_cfg=True)  # fmt: skip
    plain = sample(dit, generator=gen(9), **kwargs)
    for options in (TileOptions((8, 12), overlap=4, temporal_window=3),
                    TileOptions((64, 64), overlap=8, rope="canvas")):  # fmt: skip
        tiled = sample(dit, generator=gen(9), tiling=options, **kwargs)
        assert rel_err(tiled, plain) <= 1e-6


def test_max_tokens_per_forward_is_the_tiles():
    seen: list[int] = []

    def counting(q, k, v, valid):
        seen.append(q.shape[2])
        return sdpa_attention(q, k, v, valid)

    counting.ragged_batch = True
    dit = demo_dit(attention=counting)
    positive, negative = conds()
    options = TileOptions((8, 12), overlap=4, temporal_window=2, temporal_overlap=1)
    sample(dit, latents_or_shape=(1, 12, 4, 16, 24), positive=positive, negative=negative,
           sigmas=[1.0, 0.5, 0.0], cfg=3.0, generator=gen(1), tiling=options, batch_cfg=True)
    tile_tokens = 2 * (8 // 2) * (12 // 2)  # 48 of the 4·8·12 = 384 visual tokens
    text = 5  # the batch is cropped to the longest prompt
    tiles = len(tile_layout((4, 16, 24), options))
    assert max(seen) == tile_tokens + text
    assert len(seen) == 2 * tiles * 2  # 2 blocks × tiles × 2 steps, cond+uncond batched


def test_batched_cfg_runs_per_tile_and_equals_two_passes():
    dit = demo_dit()
    positive, negative = conds()
    options = TileOptions((8, 8), overlap=4)
    kwargs = dict(latents_or_shape=(1, 12, 2, 12, 16), positive=positive, negative=negative,
                  sigmas=linear_quadratic_schedule(2), cfg=4.5, tiling=options)  # fmt: skip
    two = sample(dit, generator=gen(4), batch_cfg=False, **kwargs)
    one = sample(dit, generator=gen(4), batch_cfg=True, **kwargs)
    torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)
    model = Recorder()
    model.supports_batched_text = True
    sample(model, generator=gen(4), batch_cfg=None, **kwargs)  # auto: asks through the wrapper
    assert {c["batch"] for c in model.calls} == {2}


def test_canvas_positions_are_the_tiles_slice_of_the_canvas():
    model = Recorder()
    x = torch.zeros(1, 12, 3, 12, 20)
    options = TileOptions((8, 8), overlap=4, temporal_window=2, temporal_overlap=1)
    TiledModel(model, options)(x, torch.ones(1), torch.zeros(1, 4, 8), torch.ones(1, 4) > 0)
    canvas = rope_positions(3, 6, 10).reshape(3, 6, 10, 3)
    for call, tile in zip(model.calls, tile_layout((3, 12, 20), options), strict=True):
        (t0, t1), (h0, h1), (w0, w1) = tile.t, tile.h, tile.w
        expected = canvas[t0:t1, h0 // 2 : h1 // 2, w0 // 2 : w1 // 2].reshape(-1, 3)
        torch.testing.assert_close(call["rope_pos"], expected, atol=1e-5, rtol=0)
    model.calls.clear()
    TiledModel(model, TileOptions((8, 8), overlap=4, rope="tile"))(
        x, torch.ones(1), torch.zeros(1, 4, 8), torch.ones(1, 4) > 0)
    assert all(c["rope_pos"] is None for c in model.calls)  # each tile as a frame of its own


def test_canvas_positions_stay_closer_to_the_untiled_velocity():
    """With position-sensitive attention (keys tied to queries) canvas positions change nothing
    but the missing context; tile-as-frame positions also stretch every distance."""
    dit = demo_dit(local=True)
    gen_ = gen(5)
    x = torch.randn(1, 12, 1, 24, 40, generator=gen_)
    feats, mask = torch.randn(1, 256, 64, generator=gen_), torch.arange(256)[None] < 20
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        full = dit(x, sigma, feats, mask)
        err = {mode: rel_err(TiledModel(dit, TileOptions((16, 24), 8, rope=mode))(
            x, sigma, feats, mask), full) for mode in ("canvas", "tile")}  # fmt: skip
    assert 0 < err["canvas"] < err["tile"], err


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"tile": (7, 8)}, "tile"), ({"tile": (8,)}, "tile"), ({"tile": (0, 8)}, "tile"),
        ({"tile": (8, 8), "overlap": 3}, "overlap"), ({"tile": (8, 8), "overlap": 8}, "overlap"),
        ({"tile": (8, 8), "overlap": 2, "temporal_window": 0}, "temporal_window"),
        ({"tile": (8, 8), "overlap": 2, "temporal_window": 2, "temporal_overlap": 2},
         "temporal_overlap"),
        ({"tile": (8, 8), "overlap": 2, "temporal_overlap": -1}, "temporal_overlap"),
        ({"tile": (8, 8), "overlap": 2, "rope": "frame"}, "rope"),
    ],
)  # fmt: skip
def test_invalid_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=rf"invalid tiling: {option} must"):
        TileOptions(**kwargs)


def test_odd_latent_and_wrong_option_type_are_refused():
    with pytest.raises(ValueError, match="even"):
        TiledModel(Recorder(), TileOptions((4, 4), 2))(
            torch.zeros(1, 12, 1, 6, 7), torch.ones(1), torch.zeros(1, 4, 8), torch.ones(1, 4) > 0)
    with pytest.raises(TypeError, match="TileOptions"):
        TiledModel(Recorder(), (8, 8))
    assert TileOptions([8, 10], 4).tile == (8, 10)
