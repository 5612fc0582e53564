"""Streamed and tiled VAE decoding/encoding: exact in time, bounded in space, no seams."""

from __future__ import annotations

import logging

import pytest
import torch

from mochi_core import vae_tiling
from mochi_core.vae import CausalCache, Decoder, EncoderConfig, decoded_frames
from tests.oracles_vae import (
    TINY_DECODER,
    build_decoder,
    build_encoder,
    random_decoder_state_dict,
    random_encoder_state_dict,
    relative_error,
)

TINY_ENCODER = EncoderConfig(channels=(32, 64, 64, 64), num_res_blocks=(1, 1, 1, 1, 1))
EXACT = 1e-5


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    sd = random_decoder_state_dict(TINY_DECODER, torch.Generator().manual_seed(11))
    return build_decoder(TINY_DECODER, sd)


@pytest.fixture(scope="module")
def clip() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-latent-frame clip at 2×3 latents and its one-shot decode."""
    return torch.randn(1, 12, 4, 2, 3, generator=torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def clip_pixels(decoder, clip) -> torch.Tensor:
    with torch.no_grad():
        return decoder(clip)


@pytest.fixture(scope="module")
def wide() -> torch.Tensor:
    """One latent frame at 8×8 latents (64×64 pixels) for the spatial tiling tests."""
    return torch.randn(1, 12, 1, 8, 8, generator=torch.Generator().manual_seed(13))


@pytest.fixture(scope="module")
def wide_pixels(decoder, wide) -> torch.Tensor:
    with torch.no_grad():
        return decoder(wide)


class Recorder(torch.nn.Module):
    """Wraps a decoder, recording the frames of every call; can raise OOM on chosen calls."""

    def __init__(self, inner: torch.nn.Module, fail_calls: set[int] | None = None) -> None:
        super().__init__()
        self.inner, self.fail_calls, self.frames = inner, fail_calls or set(), []

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        self.frames.append(z.shape[2])
        if len(self.frames) in self.fail_calls:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self.inner(z, cache)


@pytest.mark.parametrize("frames_per_chunk", [1, 2, 3, 4, 6])
def test_streamed_decode_equals_one_shot(decoder, clip, clip_pixels, frames_per_chunk):
    """Chunks of 1, 2, 3 (not dividing T=4), T and more than T latent frames."""
    recorder = Recorder(decoder)
    out = vae_tiling.decode(recorder, clip, frames_per_chunk=frames_per_chunk)
    assert out.shape == clip_pixels.shape == (1, 3, decoded_frames(4), 16, 24)
    assert relative_error(out, clip_pixels) <= EXACT
    assert max(recorder.frames) <= frames_per_chunk and sum(recorder.frames) == 4


def test_restarting_the_causal_context_per_chunk_would_not_be_exact(decoder, clip, clip_pixels):
    """What Genmo's tiled_full / kijai do (independent chunks) differs: the cache matters."""
    with torch.no_grad():
        first = decoder(clip[:, :, :2])
        restarted = decoder(clip[:, :, 2:])  # a fresh causal context, frames dropped again
    assert first.shape[2] + restarted.shape[2] == clip_pixels.shape[2] - 5
    assert torch.allclose(first, clip_pixels[:, :, : first.shape[2]], rtol=0, atol=1e-5)
    assert relative_error(restarted, clip_pixels[:, :, -restarted.shape[2]:]) > 0.05


def test_stream_state_is_bounded_and_independent_of_clip_length(decoder):
    """Only k − 1 = 2 frames per causal conv are carried, however long the clip."""
    z = torch.randn(1, 12, 5, 2, 2, generator=torch.Generator().manual_seed(14))
    cache, sizes, frames = CausalCache(), [], []
    with torch.no_grad():
        for t in range(5):
            frames.append(decoder(z[:, :, t : t + 1], cache).shape[2])
            assert all(h.shape[2] == 2 for h in cache.history.values())
            sizes.append(sum(h.numel() for h in cache.history.values()))
    three_tap = sum(m.kernel_size[0] == 3 for m in decoder.modules() if hasattr(m, "kernel_size"))
    assert len(cache.history) == three_tap
    assert frames == [1, 6, 6, 6, 6] and cache.started
    assert len(set(sizes)) == 1  # flat: the carried state does not grow with the clip


def _border_band(height: int, width: int, boxes, scale: int, band: int) -> torch.Tensor:
    """True within ``band`` pixels of every tile edge that lies inside the image."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for y0, y1, x0, x1 in boxes:
        for edge in (y0 * scale, y1 * scale):
            if 0 < edge < height:
                mask[max(0, edge - band) : edge + band, :] = True
        for edge in (x0 * scale, x1 * scale):
            if 0 < edge < width:
                mask[:, max(0, edge - band) : edge + band] = True
    return mask


def _tiled_error(decoder, wide, wide_pixels, tile: int, overlap: int) -> dict[str, float]:
    out = vae_tiling.decode(decoder, wide, frames_per_chunk=1, tile_size=tile, tile_overlap=overlap)
    err = (out - wide_pixels).abs()
    per_pixel = err.mean(dim=(0, 1, 2))
    boxes = vae_tiling._tiles(8, 8, tile, overlap)
    band = _border_band(*per_pixel.shape, boxes, 8, 3)
    return {
        "mean": err.mean().item(), "max": err.max().item(),
        "rel": relative_error(out, wide_pixels),
        "border_over_inner": (per_pixel[band].mean() / per_pixel[~band].mean()).item(),
    }


@pytest.fixture(scope="module")
def feathered(decoder, wide, wide_pixels) -> dict[str, float]:
    """Errors of 6-latent tiles with overlap 2 (2 × 2 tiles) against the one-shot decode."""
    return _tiled_error(decoder, wide, wide_pixels, tile=6, overlap=2)


def test_spatial_tiles_error_is_bounded(feathered, record_property):
    """Tiles differ from the one-shot decode only through per-tile GroupNorm statistics.

    Measured (random weights, 6-latent tiles, overlap 2): mean |Δ| 0.052, max 0.42, relative
    0.093 (pixels of mean magnitude ~0.5).
    """
    errors = feathered
    record_property("tiled_6_overlap_2", errors)
    assert errors["mean"] <= 0.06 and errors["max"] <= 0.5 and errors["rel"] <= 0.12


def test_spatial_tiles_leave_no_seams(decoder, wide, wide_pixels, feathered, record_property):
    """The error is not concentrated at tile edges when tiles are feathered ...

    ... while the same measure does flag abutting, unblended tiles (the control), so it can fail.
    """
    abutting = _tiled_error(decoder, wide, wide_pixels, tile=4, overlap=0)
    record_property("border_over_inner", (feathered["border_over_inner"],
                                          abutting["border_over_inner"]))
    assert feathered["border_over_inner"] <= 1.1
    assert abutting["border_over_inner"] >= 1.5


def test_tiles_are_streamed_exactly(decoder, clip):
    """Within each tile, temporal streaming is still exact."""
    one_shot = vae_tiling.decode(decoder, clip, tile_size=2, tile_overlap=1)
    streamed = vae_tiling.decode(decoder, clip, frames_per_chunk=3, tile_size=2, tile_overlap=1)
    assert relative_error(streamed, one_shot) <= EXACT


def test_callback_counts_every_tile_and_chunk(decoder, clip):
    calls: list[tuple[int, int]] = []
    vae_tiling.decode(decoder, clip, frames_per_chunk=2, tile_size=2, tile_overlap=1,
                      callback=lambda done, total: calls.append((done, total)))
    tiles, chunks = 2, 2  # 1 × 2 tiles of 2 on a 2 × 3 grid; 4 latent frames two at a time
    assert calls == [(i, tiles * chunks) for i in range(1, tiles * chunks + 1)]


def test_out_of_memory_retries_with_smaller_chunks_and_logs(decoder, clip, clip_pixels, caplog):
    flaky = Recorder(decoder, fail_calls={1})
    with caplog.at_level(logging.WARNING, logger="mochi_core.vae_tiling"):
        out = vae_tiling.decode(flaky, clip, frames_per_chunk=4)
    assert flaky.frames == [4, 2, 2]  # failed at 4 frames, retried with 2 per chunk
    assert relative_error(out, clip_pixels) <= EXACT  # the retry is still exact
    assert "out of memory" in caplog.text and "retrying with 2" in caplog.text


def test_out_of_memory_shrinks_tiles_then_gives_up(decoder, clip):
    always = Recorder(decoder, fail_calls=set(range(1, 100)))
    with pytest.raises(torch.OutOfMemoryError):
        vae_tiling.decode(always, clip, frames_per_chunk=2)
    # 2 frames untiled → 1 frame untiled → the 2 × 3 grid is below the smallest tile: give up.
    assert always.frames == [2, 1]
    flaky = Recorder(decoder, fail_calls={1})
    out = vae_tiling.decode(flaky, torch.randn(1, 12, 1, 16, 16), frames_per_chunk=1,
                            tile_overlap=0)
    assert flaky.frames == [1] * 5 and out.shape == (1, 3, 1, 128, 128)  # then 4 tiles of 8


def test_tile_layout_and_feather_weights():
    assert vae_tiling.tile_starts(8, 8, 2) == [0]
    assert vae_tiling.tile_starts(16, 8, 4) == [0, 4, 8]
    starts = vae_tiling.tile_starts(30, 8, 2)
    assert starts[0] == 0 and starts[-1] == 22
    assert all(b - a <= 6 for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError, match="overlap"):
        vae_tiling.tile_starts(30, 8, 8)
    w = vae_tiling.feather(8, 4, fade_in=True, fade_out=False)
    assert torch.equal(w, torch.tensor([0.125, 0.375, 0.625, 0.875, 1, 1, 1, 1]))
    assert torch.equal(vae_tiling.feather(8, 4, fade_in=False, fade_out=False), torch.ones(8))


def test_tiled_encode(record_property):
    encoder = build_encoder(
        TINY_ENCODER, random_encoder_state_dict(TINY_ENCODER, torch.Generator().manual_seed(15))
    )
    pixels = torch.rand(1, 3, 1, 48, 48, generator=torch.Generator().manual_seed(16)) * 2 - 1
    with torch.no_grad():
        reference = encoder.encode(pixels)
    assert torch.equal(vae_tiling.encode(encoder, pixels), reference)
    calls: list[tuple[int, int]] = []
    tiled = vae_tiling.encode(encoder, pixels, tile_size=4, tile_overlap=2,
                              callback=lambda d, t: calls.append((d, t)))
    err = (tiled - reference).abs()
    record_property("tiled_encode_mean_max_rel",
                    (err.mean().item(), err.max().item(), relative_error(tiled, reference)))
    assert tiled.shape == reference.shape == (1, 12, 1, 6, 6)
    assert calls[-1] == (4, 4)
    assert relative_error(tiled, reference) <= 0.25  # measured 0.23 (4-latent tiles: coarse GN)


class IndexMathRecorder(Recorder):
    """A Recorder whose failing calls raise what a CUDA kernel raises for a tensor past 2^31."""

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        self.frames.append(z.shape[2])
        if len(self.frames) in self.fail_calls:
            raise RuntimeError("Expected canUse32BitIndexMath(input) && "
                               "canUse32BitIndexMath(output) to be true, but got false.")
        return self.inner(z, cache)


def test_index_math_refusal_retries_like_an_oom(decoder, clip, clip_pixels, caplog):
    flaky = IndexMathRecorder(decoder, fail_calls={1})
    with caplog.at_level(logging.WARNING, logger="mochi_core.vae_tiling"):
        out = vae_tiling.decode(flaky, clip, frames_per_chunk=4)
    assert flaky.frames == [4, 2, 2]  # refused at 4 frames, retried with 2 per chunk
    assert relative_error(out, clip_pixels) <= EXACT
    assert "2^31 elements" in caplog.text and "retrying with 2" in caplog.text
    other = Recorder(decoder)
    other.forward = lambda z, cache=None: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        vae_tiling.decode(other, clip, frames_per_chunk=4)
