"""Decoding that is exact in time and bounded in memory; tiled encoding (SPEC §3.8, §8.13).

**Temporal streaming (exact).** The decoder is causal and its GroupNorm is per frame, so a
clip can be decoded a few latent frames at a time: a :class:`~mochi_core.vae.CausalCache`
carries each causal convolution's last ``k − 1`` input frames (and whether the clip's first
frame, whose depth-to-space drops frames, is behind us) from one chunk to the next. The
concatenated chunks equal the one-shot decode, and peak activation memory depends on the
chunk length, not on the clip length. Genmo's ``tiled_full`` and kijai's decoders instead
restart the causal context per chunk, which changes the frames after every chunk border.

**Spatial tiles (approximate).** Tiles overlap by ``tile_overlap`` latent pixels and are
blended with linear ramps normalised by the summed weights. Tiles are not exact because each
frame's GroupNorm statistics are taken over the tile instead of the whole frame; each tile is
streamed in time, so tiles and chunks combine.

**Out of memory.** :func:`decode` catches ``torch.OutOfMemoryError``, and a CUDA kernel's
``canUse32BitIndexMath`` refusal of a tensor past 2^31 elements, logs it, and retries first with
half as many frames per chunk (exact), then with half-size tiles (approximate).

**Encoder.** :func:`encode` tiles in space only. It does not stream in time, by decision: the
encoder's temporal attention is causal, so caching every attention layer's keys and values
per spatial position would make streaming exact, but that cache grows with the clip and is
as large as the one-shot encoder's peak. Per input pixel and frame it holds
3·2·128/4 = 192 values at level 1 (three attention layers, 128 channels at H/2 × W/2, no
temporal reduction), 64 at level 2 and ~18 below: ~274 values, against ~260 for the one-shot
peak (a few 64-channel tensors at full resolution). Streaming would therefore not bound
memory; spatial tiles do.

**Non-finite values.** :func:`decode` and :func:`encode` check their result once; NaN/Inf
(e.g. an fp16 overflow) raises :class:`mochi_core.finite.NonFiniteError` naming the dtype.

Progress: ``callback(done, total)`` after every (tile, chunk). After an OOM retry the count
restarts with the new total.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from einops import rearrange
from torch import nn

from . import memory
from .finite import check_vae_output
from .vae import (
    SPATIAL_FACTOR,
    CausalCache,
    DecoderConfig,
    Encoder,
    decoded_frames,
    latent_frames,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
#: Runs one tile's input and yields ``(first output frame, output chunk)`` pairs.
TileRunner = Callable[[torch.Tensor], Iterator[tuple[int, torch.Tensor]]]

#: Smallest tile (latent pixels) the OOM fallback shrinks to.
MIN_TILE = 8
DEFAULT_OVERLAP = 4


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` covering ``range(length)`` in pieces of ``chunk`` (last shorter)."""
    if chunk < 1:
        raise ValueError(f"chunk length must be >= 1, got {chunk}")
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts over ``size`` so neighbours overlap by at least ``overlap``.

    The first tile starts at 0 and the last ends at ``size``; one tile if it fits.
    """
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got {overlap} for tile {tile}")
    count = -(-(size - overlap) // (tile - overlap))  # ceil
    count = max(count, 2)
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def feather(length: int, ramp: int, *, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """1-D blend weights: linear ramps of ``ramp`` samples on the faded sides, 1 elsewhere.

    The ramp values ``(i + 0.5) / ramp`` stay positive, so normalised blending never divides
    by zero. Returns an fp32 tensor of ``length``.
    """
    w = torch.ones(length)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if fade_in:
            w[:ramp] = up
        if fade_out:
            w[length - ramp:] = up.flip(0)
    return w


def _tiles(h: int, w: int, tile: int | None, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(y0, y1, x0, x1)`` on an ``h × w`` grid (one whole tile when ``tile`` is None)."""
    if tile is None:
        return [(0, h, 0, w)]
    th, tw = min(tile, h), min(tile, w)
    return [
        (y, y + th, x, x + tw)
        for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)
    ]


def _tile_weight(
    box: tuple[int, int, int, int], grid: tuple[int, int], ramp: int, scale: int
) -> torch.Tensor:
    """``(y1−y0)·scale × (x1−x0)·scale`` weights, ramped on sides that have a neighbour."""
    y0, y1, x0, x1 = box
    wy = feather((y1 - y0) * scale, ramp, fade_in=y0 > 0, fade_out=y1 < grid[0])
    wx = feather((x1 - x0) * scale, ramp, fade_in=x0 > 0, fade_out=x1 < grid[1])
    return wy[:, None] * wx[None, :]


def _blend_tiles(
    run: TileRunner, x: torch.Tensor, *, grid: tuple[int, int], scales: tuple[int, int],
    out_frames: int, tile: int | None, overlap: int, steps_per_tile: int,
    callback: ProgressCallback | None,
) -> torch.Tensor:
    """Run every tile of ``x`` through ``run`` and blend the outputs.

    ``grid`` is the latent ``h × w``; ``scales`` = (input, output) pixels per latent pixel.
    Returns ``B × C × out_frames × h·s_out × w·s_out`` in fp32.
    """
    (s_in, s_out), boxes = scales, _tiles(*grid, tile, overlap)
    out = weights = None
    total, done = len(boxes) * steps_per_tile, 0
    for box in boxes:
        y0, y1, x0, x1 = box
        weight = None
        if len(boxes) > 1:
            weight = _tile_weight(box, grid, overlap * s_out, s_out).to(x.device)
        for f0, chunk in run(x[..., y0 * s_in : y1 * s_in, x0 * s_in : x1 * s_in]):
            if out is None:
                b, c = chunk.shape[:2]
                out = x.new_zeros((b, c, out_frames, grid[0] * s_out, grid[1] * s_out),
                                  dtype=torch.float32)
                weights = x.new_zeros(out.shape[-2:], dtype=torch.float32)
            region = out[:, :, f0 : f0 + chunk.shape[2],
                         y0 * s_out : y1 * s_out, x0 * s_out : x1 * s_out]
            region.add_(chunk if weight is None else chunk * weight)
            done += 1
            if callback is not None:
                callback(done, total)
        weights[y0 * s_out : y1 * s_out, x0 * s_out : x1 * s_out] += (
            1.0 if weight is None else weight
        )
    return out if len(boxes) == 1 else out / weights


def stream_decode(
    decoder: nn.Module, z_vae: torch.Tensor, frames_per_chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode ``z_vae`` (``B × 12 × T × h × w``) a few latent frames at a time, exactly.

    Yields ``(first pixel frame, pixels)``: the first chunk of ``n`` latent frames gives
    ``6n − 5`` frames, later ones ``6n``. One :class:`CausalCache` carries the causal context,
    so the concatenation equals ``decoder(z_vae)``.
    """
    cache = CausalCache()
    for t0, t1 in chunk_bounds(z_vae.shape[2], frames_per_chunk):
        pixels = decoder(z_vae[:, :, t0:t1], cache)
        yield (0 if t0 == 0 else decoded_frames(t0)), pixels


def _check_latent(z_vae: torch.Tensor) -> None:
    if z_vae.ndim != 5 or 0 in z_vae.shape:
        raise ValueError(f"expected latents B × 12 × T × h × w, got shape {tuple(z_vae.shape)}")


def _shrink(
    frames_per_chunk: int, tile: int | None, grid: tuple[int, int]
) -> tuple[int, int | None] | None:
    """The next smaller setting after an OOM: fewer frames per chunk, then smaller tiles."""
    if frames_per_chunk > 1:
        return frames_per_chunk // 2, tile
    current = tile if tile is not None else max(grid)
    if current <= MIN_TILE:
        return None
    return 1, max(MIN_TILE, current // 2)


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: Text of the RuntimeError a CUDA kernel raises for a tensor past 2^31 elements.
INDEX_MATH_ERROR = "canUse32BitIndexMath"


def _too_large(error: RuntimeError) -> bool:
    """Whether ``error`` is an OOM or a kernel's refusal of a tensor past 32-bit indexing; both
    go away with smaller chunks or tiles."""
    return isinstance(error, torch.OutOfMemoryError) or INDEX_MATH_ERROR in str(error)


def _with_oom_retry(
    attempt: Callable[[int, int | None], torch.Tensor], frames_per_chunk: int,
    tile: int | None, grid: tuple[int, int], device: torch.device,
) -> torch.Tensor:
    """Call ``attempt(frames_per_chunk, tile)``, shrinking both on ``torch.OutOfMemoryError``
    or on a kernel's ``canUse32BitIndexMath`` refusal (a tensor past 2^31 elements)."""
    while True:
        try:
            return attempt(frames_per_chunk, tile)
        except RuntimeError as error:
            if not _too_large(error):
                raise
            why = "out of memory" if isinstance(error, torch.OutOfMemoryError) else (
                "a tensor past 2^31 elements")  # fmt: skip
            smaller = _shrink(frames_per_chunk, tile, grid)
            if smaller is None:
                log.error("VAE %s at the smallest setting (tile %s)", why, tile)
                raise
        log.warning(
            "VAE %s with %d latent frame(s) per chunk and tile %s; retrying with %d "
            "and tile %s", why, frames_per_chunk, tile, *smaller,
        )
        frames_per_chunk, tile = smaller
        _free_memory(device)


def decode(
    decoder: nn.Module, z_vae: torch.Tensor, *, frames_per_chunk: int | None = None,
    tile_size: int | None = None, tile_overlap: int = DEFAULT_OVERLAP,
    callback: ProgressCallback | None = None, check_memory: bool = True,
) -> torch.Tensor:
    """Decode latents in VAE space to pixels, streamed in time and optionally tiled in space.

    ``z_vae``: ``B × 12 × T × h × w``; computes in ``z_vae.dtype``. ``frames_per_chunk``:
    latent frames per decoder call (None: the whole clip; results are exact for any value).
    ``tile_size`` / ``tile_overlap``: square tiles and their overlap in latent pixels (None:
    no spatial tiling). Returns fp32 pixels ``B × 3 × (6T − 5) × 8h × 8w`` in about [-1, 1].

    ``check_memory``: before decoding, estimate the memory (:mod:`mochi_core.memory`); when the
    job does not fit, decode fewer frames per chunk (the result is the same) or, if even one
    frame at a time does not fit, raise ``InsufficientMemoryError`` naming the tile sizes that
    would. An out-of-memory error during the decode still shrinks chunks, then tiles.
    """
    _check_latent(z_vae)
    t, grid = z_vae.shape[2], (z_vae.shape[3], z_vae.shape[4])
    if check_memory and isinstance(getattr(decoder, "config", None), DecoderConfig):
        job = memory.check_decode(memory.DecodeJob(
            decoder.config, tuple(z_vae.shape), z_vae.dtype, frames_per_chunk, tile_size,
            tile_overlap), z_vae.device)  # fmt: skip
        frames_per_chunk = job.frames_per_chunk

    def attempt(chunk: int, tile: int | None) -> torch.Tensor:
        return _blend_tiles(
            lambda z: stream_decode(decoder, z, chunk), z_vae, grid=grid,
            scales=(1, SPATIAL_FACTOR), out_frames=decoded_frames(t), tile=tile,
            overlap=tile_overlap, steps_per_tile=len(chunk_bounds(t, chunk)), callback=callback,
        )

    with torch.no_grad():
        pixels = _with_oom_retry(attempt, frames_per_chunk or t, tile_size, grid, z_vae.device)
    check_vae_output(pixels, "decoder output", z_vae.dtype)
    return pixels


def to_images(pixels: torch.Tensor, device: torch.device | str,
              frames_per_chunk: int = memory.IMAGE_CHUNK_FRAMES) -> torch.Tensor:
    """Decoder pixels ``B × 3 × F × H × W`` in [−1, 1] → images ``(B·F) × H × W × 3`` fp32 in
    [0, 1] on ``device`` (the host's IMAGE).

    Chunk by chunk: ``frames_per_chunk`` frames at a time are copied into the output on
    ``device`` and converted there in place, so the pixels' device holds at most one chunk
    besides the pixels (counted by :meth:`memory.DecodeJob.image_chunk_bytes`), and an
    out-of-memory error cannot throw away a finished decode. The values are those of
    ``((pixels.float() + 1) / 2).clamp(0, 1)``, bit for bit.
    """
    B, C, F, H, W = pixels.shape
    frames = rearrange(pixels, "b c f h w -> (b f) h w c")  # a view
    out = torch.empty(B * F, H, W, C, dtype=torch.float32, device=device)
    for start in range(0, B * F, frames_per_chunk):
        chunk = out[start:start + frames_per_chunk]
        chunk.copy_(frames[start:start + frames_per_chunk])
        chunk.add_(1.0).div_(2.0).clamp_(0.0, 1.0)
    return out


def encode(
    encoder: Encoder, pixels: torch.Tensor, *, tile_size: int | None = None,
    tile_overlap: int = DEFAULT_OVERLAP, callback: ProgressCallback | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Encode pixels to the latent mean in VAE space, optionally in spatial tiles.

    ``pixels``: ``B × 3 × (6k+1) × H × W`` in [-1, 1], H and W multiples of 8. ``tile_size``
    and ``tile_overlap`` are in latent pixels (×8 in pixels). Not streamed in time (see the
    module docstring). On OOM the tiles are halved. Returns fp32 ``B × 12 × (k+1) × H/8 × W/8``.
    """
    encoder.check_pixels(pixels)
    t = latent_frames(pixels.shape[2])
    grid = (pixels.shape[3] // SPATIAL_FACTOR, pixels.shape[4] // SPATIAL_FACTOR)

    def run(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, encoder.encode(x, dtype)

    def attempt(_: int, tile: int | None) -> torch.Tensor:
        return _blend_tiles(
            run, pixels, grid=grid, scales=(SPATIAL_FACTOR, 1), out_frames=t, tile=tile,
            overlap=tile_overlap, steps_per_tile=1, callback=callback,
        )

    with torch.no_grad():
        latents = _with_oom_retry(attempt, 1, tile_size, grid, pixels.device)
    check_vae_output(latents, "encoder output", dtype)
    return latents
