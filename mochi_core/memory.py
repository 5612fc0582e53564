"""Fits before it runs: a job's memory need, estimated from shapes, against the free memory.

A 10B-parameter DiT and a decoder that upsamples 48× in volume can ask for tens of GB; running
out halfway through a job leaves a server in a bad state and wastes the minutes already spent.
So the sampler and the decoder first estimate what they need and refuse a job that cannot fit,
with the estimate and the options that would fit (tiling, separate CFG passes, smaller frame
chunks, fp8 weights, block offload).

**How the need is estimated.** Not from hand-typed constants: the model's own forward (the DiT)
or decoder call is traced on ``meta`` tensors with :class:`~mochi_core.estimates.LiveBytes`,
which records the peak bytes of the tensors alive during the call, with attention allocating
only its output as the fused kernels do. The DiT is traced at depth 1 (every block frees its
intermediates, so depth only adds weights, which are already resident); the decoder for the
first two frame chunks of its largest tile (later chunks repeat the second). The sampler adds its
fp32 latent state (the latents, the velocities of both CFG passes, the preview, the tiling
accumulators); the decoder adds its fp32 output and blending weights. Traces are cached per
shape. A margin (:data:`MARGIN`, :data:`MARGIN_BYTES`) covers what a trace cannot see: allocator
caching and fragmentation, library workspaces, the Python process itself.

**Free memory.** CUDA: the driver's free memory plus what PyTorch holds cached but unused. CPU:
the kernel's ``MemAvailable``. A limit can also be set for shared machines: the environment
variable ``MOCHI_MEMORY_LIMIT_GB`` caps the memory one sampler or decoder run may plan to use.

**32-bit indexing.** CUDA convolution kernels refuse tensors past 2^31 elements; the same
decoder trace records the largest convolution input and output, and on a GPU the frame chunk
(then the tile) is bounded by :data:`INDEX_LIMIT` before memory is considered.

These are estimates: the traced peaks were compared with measured CPU peaks in the tests, not on
a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .dit import DiTConfig
from .estimates import LiveBytes, trace_dit_activations
from .tiled_sampling import TileOptions, tile_layout
from .vae import Decoder, DecoderConfig, decoded_frames

log = logging.getLogger(__name__)

GIB = 1024**3
#: Relative and absolute margin added to every traced estimate (see the module docstring).
MARGIN = 1.25
MARGIN_BYTES = 256 * 1024**2
LIMIT_ENV = "MOCHI_MEMORY_LIMIT_GB"
#: Latent-sized fp32 tensors the sampler keeps: latents, noise, the two CFG velocities, their
#: blend, the x0 preview, and (tiled) the accumulated velocity and its weights.
SAMPLER_STATE_COPIES = 8
#: Spatial tile sides (pixels) and frame chunks tried when looking for a setting that fits.
DIT_TILES = (768, 512, 384, 256)
DECODE_TILES = (512, 384, 256, 128)
DECODE_CHUNKS = (8, 4, 2, 1)
#: The most elements one convolution input or output may have: CUDA convolution kernels index
#: with 32 bits and refuse larger tensors (``canUse32BitIndexMath``), which is not an OOM.
INDEX_LIMIT = 2**31 - 1


class InsufficientMemoryError(RuntimeError):
    """A job whose estimated need exceeds the free memory of its device (raised before it runs)."""


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def with_margin(need: int) -> int:
    return int(need * MARGIN) + MARGIN_BYTES


# --------------------------------------------------------------------------------------------
# Free memory


def _mem_available_cpu() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else psutil's figure, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # noqa: PLC0415  (optional; the host installs it)
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def memory_limit() -> int | None:
    """The ``MOCHI_MEMORY_LIMIT_GB`` cap in bytes, or None; a bad value is a clear error."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{LIMIT_ENV} must be a positive number of GB (e.g. 12); got {raw!r}")
    return int(value * GIB)


def device_free_bytes(device: torch.device | str) -> int | None:
    """Memory a job on ``device`` can still use (None when unknown), before the limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    if device.type == "cpu":
        return _mem_available_cpu()
    return None


def free_bytes(device: torch.device | str) -> tuple[int | None, bool]:
    """``(bytes a job on device may use, whether MOCHI_MEMORY_LIMIT_GB is what bounds it)``;
    the bytes are None when neither the device's free memory nor a limit is known."""
    available, limit = device_free_bytes(device), memory_limit()
    if limit is not None and (available is None or limit < available):
        return limit, True
    return available, False


# --------------------------------------------------------------------------------------------
# The sampler


@functools.lru_cache(maxsize=64)
def _dit_activations(config: DiTConfig, thw: tuple[int, int, int], text_tokens: int, batch: int,
                     compute_dtype: torch.dtype, storage_dtype: torch.dtype) -> int:
    one_block = dataclasses.replace(config, depth=1)
    return trace_dit_activations(one_block, thw, text_tokens=text_tokens, batch=batch,
                                 compute_dtype=compute_dtype, storage_dtype=storage_dtype)


@dataclass(frozen=True)
class DiTJob:
    """What decides the sampler's memory: the model, the latents, the text and the options."""

    config: DiTConfig
    latent_shape: tuple[int, int, int, int, int]  # B × 12 × T × h × w (DiT space)
    text_tokens: int
    batch_cfg: bool
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype
    tiling: TileOptions | None = None

    def need(self) -> int:
        """Bytes of one sampling step: the DiT's activation peak plus the latent state."""
        B, _, T, H, W = self.latent_shape
        thw = (T, H, W)
        if self.tiling is not None:
            tiles = tile_layout(thw, self.tiling)
            thw = max(((t.t[1] - t.t[0], t.h[1] - t.h[0], t.w[1] - t.w[0]) for t in tiles),
                      key=lambda s: s[0] * s[1] * s[2])
        batch = 2 * B if self.batch_cfg else B
        activations = _dit_activations(self.config, thw, max(self.text_tokens, 1), batch,
                                       self.compute_dtype, self.storage_dtype)
        state = SAMPLER_STATE_COPIES * B * 12 * T * H * W * 4
        return activations + state

    def tokens(self) -> int:
        _, _, T, H, W = self.latent_shape
        return T * (H // self.config.patch_size) * (W // self.config.patch_size)


def dit_job(model, latent_shape: Sequence[int], texts: Sequence, batch_cfg: bool,
            tiling: TileOptions | None) -> DiTJob | None:
    """The :class:`DiTJob` of sampling ``model`` (an ``AsymmDiT``; None for any other model,
    whose memory cannot be traced). ``texts``: the conditionings (None entries are skipped)."""
    config = getattr(model, "config", None)
    if not isinstance(config, DiTConfig) or not isinstance(model, torch.nn.Module):
        return None
    tokens = max((int(t.mask.sum(-1).max()) for t in texts if t is not None), default=1)
    storage = model.blocks[0].attn.qkv_x.weight.dtype if len(model.blocks) else torch.float32
    return DiTJob(config, tuple(latent_shape), tokens, batch_cfg,
                  model.resolved_compute_dtype(), storage, tiling)  # fmt: skip


def weight_bytes_on(model, device: torch.device | str) -> int:
    """Bytes of ``model``'s parameters and buffers that sit on ``device``."""
    if not isinstance(model, torch.nn.Module):
        return 0
    device = torch.device(device)
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()]
               if t.device.type == device.type)


def _dit_tiling(tile_px: int) -> TileOptions:
    side = tile_px // 8
    return TileOptions(tile=(side, side), overlap=side // 4 // 2 * 2)


def _fitting_tiling(job: DiTJob, available: int) -> DiTJob | None:
    """``job`` with the largest DiT tiling of :data:`DIT_TILES` that fits (with the job's own
    CFG batching if possible, else with separate passes), or None."""
    H, W = job.latent_shape[3:]
    for px in DIT_TILES:
        if px // 8 >= max(H, W):
            continue
        for batched in dict.fromkeys((job.batch_cfg, False)):
            tiled = dataclasses.replace(job, tiling=_dit_tiling(px), batch_cfg=batched)
            if with_margin(tiled.need()) <= available:
                return tiled
    return None


def dit_alternatives(job: DiTJob, available: int, weights_on_device: int,
                     device: torch.device) -> list[str]:
    """The options that would make ``job`` fit in ``available`` bytes, as sentences.

    ``weights_on_device``: bytes of the DiT's weights that fp8 storage or offloading would free
    (0 when the bound is a limit on the job's own memory, which weights do not count against).
    """
    out = []
    if job.batch_cfg:
        alone = dataclasses.replace(job, batch_cfg=False)
        if with_margin(alone.need()) <= available:
            out.append(f"batch_cfg 'separate' (two passes per step): "
                       f"{gib(with_margin(alone.need()))}")
    if (tiled := _fitting_tiling(job, available)) is not None:
        px, overlap = tiled.tiling.tile[0] * 8, tiled.tiling.overlap * 8
        how = "" if tiled.batch_cfg == job.batch_cfg else ", batch_cfg 'separate'"
        out.append(f"DiT tiling with {px} px tiles, {overlap} px overlap{how} "
                   f"(Mochi 1 DiT Tiling node, or --dit-tile {px}): "
                   f"{gib(with_margin(tiled.need()))}")
    freed = weights_on_device // 2 if job.storage_dtype.itemsize >= 2 else 0
    if freed and with_margin(job.need()) <= available + freed:
        out.append(f"fp8 weights (weight_dtype fp8_e4m3fn, or --weight-dtype fp8): frees about "
                   f"{gib(freed)} of the {gib(weights_on_device)} of weights on the device")
    if (device.type == "cuda" and weights_on_device
            and with_margin(job.need()) <= available + weights_on_device):
        out.append(f"offloading the DiT's blocks (ComfyUI --novram, which streams all of "
                   f"them, or --offload-blocks N): "
                   f"frees up to {gib(weights_on_device)}")
    return out


def check_dit(job: DiTJob, device: torch.device | str, weights_on_device: int = 0) -> int | None:
    """Raise :class:`InsufficientMemoryError` when ``job`` cannot fit on ``device``.

    Returns the estimated need with its margin (None when the free memory is unknown, in which
    case nothing is checked).
    """
    need = with_margin(job.need())
    available, limited = free_bytes(device)
    if available is None:
        log.info("free memory of %s unknown; sampling without a memory check", device)
        return None
    if need <= available:
        return need
    B, _, T, H, W = job.latent_shape
    options = dit_alternatives(job, available, 0 if limited else weights_on_device,
                               torch.device(device))  # fmt: skip
    raise InsufficientMemoryError(
        f"this sampling job needs about {gib(need)} on {device} ({job.tokens():,} video tokens "
        f"from latents {T}×{H}×{W}, batch {2 * B if job.batch_cfg else B}"
        f"{', tiled' if job.tiling else ''}; estimate with a {MARGIN:.2f}× margin) but only "
        f"{gib(available)} is free{_limit_note()}. "
        + _options_text(options, "a smaller width, height or frame count"))


# --------------------------------------------------------------------------------------------
# The decoder


class ConvSizes(TorchDispatchMode):
    """Records the largest element count of any convolution input or output run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.largest = max(self.largest, args[0].numel(), out.numel())
        return out


@functools.lru_cache(maxsize=64)
def _decoder_trace(config: DecoderConfig, latent: tuple[int, int, int, int], chunk: int,
                   dtype: torch.dtype) -> tuple[int, int]:
    """(peak bytes, largest convolution input or output in elements) of decoding the first two
    ``chunk``-frame chunks of a ``B × T × h × w`` latent tile (weights and input excluded),
    traced on meta."""
    from .vae_tiling import stream_decode  # noqa: PLC0415  (vae_tiling imports this module)

    B, T, h, w = latent
    decoder = Decoder(config, device="meta", dtype=dtype)
    z = torch.empty(B, config.latent_channels, min(T, 2 * chunk), h, w, device="meta",
                    dtype=dtype)
    tracker, convs = LiveBytes(), ConvSizes()
    with tracker, convs, torch.no_grad():
        for _, pixels in stream_decode(decoder, z, chunk):
            del pixels
    return tracker.peak, convs.largest


def _decoder_peak(config: DecoderConfig, latent: tuple[int, int, int, int], chunk: int,
                  dtype: torch.dtype) -> int:
    """Peak bytes of decoding the first two ``chunk``-frame chunks (see :func:`_decoder_trace`)."""
    return _decoder_trace(config, latent, chunk, dtype)[0]


#: Frames per step of the conversion of decoded pixels to images (``vae_tiling.to_images``).
IMAGE_CHUNK_FRAMES = 8


@dataclass(frozen=True)
class DecodeJob:
    """What decides the decoder's memory."""

    config: DecoderConfig
    latent_shape: tuple[int, int, int, int, int]  # B × 12 × T × h × w (VAE space)
    dtype: torch.dtype
    frames_per_chunk: int | None = None
    tile: int | None = None  # latent pixels
    overlap: int = 0

    def __post_init__(self) -> None:
        shape = self.latent_shape
        if len(shape) != 5 or shape[1] != self.config.latent_channels or 0 in shape:
            raise ValueError(f"decoder expects latents B × {self.config.latent_channels} × T × "
                             f"h × w (VAE space), got shape {tuple(shape)}")

    def output_bytes(self) -> int:
        """The fp32 pixels of the whole clip."""
        B, _, T, h, w = self.latent_shape
        return 4 * B * self.config.out_channels * decoded_frames(T) * h * w * 64

    def image_chunk_bytes(self) -> int:
        """What converting the output to images leaves on the device: one fp32 chunk of
        :data:`IMAGE_CHUNK_FRAMES` frames (see :func:`mochi_core.vae_tiling.to_images`)."""
        B, _, T, h, w = self.latent_shape
        frames = min(IMAGE_CHUNK_FRAMES, B * decoded_frames(T))
        return 4 * self.config.out_channels * frames * h * w * 64

    def _tile_latent(self) -> tuple[int, int, int, int]:
        """``B × T × th × tw`` of the largest tile."""
        B, _, T, h, w = self.latent_shape
        th, tw = (h, w) if self.tile is None else (min(self.tile, h), min(self.tile, w))
        return B, T, th, tw

    def largest_conv(self) -> int:
        """Elements of the largest convolution input or output of a decoder call (traced)."""
        chunk = min(self.frames_per_chunk or self.latent_shape[2], self.latent_shape[2])
        return _decoder_trace(self.config, self._tile_latent(), chunk, self.dtype)[1]

    def need(self) -> int:
        B, _, T, h, w = self.latent_shape
        chunk = min(self.frames_per_chunk or T, T)
        _, _, th, tw = self._tile_latent()
        work = _decoder_peak(self.config, self._tile_latent(), chunk, self.dtype)
        tile_out = B * self.config.out_channels * decoded_frames(chunk) * th * tw * 64
        # the output, the blending weights (fp32, one per pixel) and one weighted chunk; after
        # the decode, the image conversion needs one chunk of frames next to the output
        blend = 4 * (h * w * 64 + tile_out)
        return self.output_bytes() + max(work + blend, self.image_chunk_bytes())


def fitting_decode(job: DecodeJob, available: int) -> DecodeJob | None:
    """``job`` with the largest frame chunk (exact: the result does not change) that fits at its
    tile size, or None."""
    largest = job.frames_per_chunk or job.latent_shape[2]
    for chunk in dict.fromkeys(c for c in (largest, *DECODE_CHUNKS) if c <= largest):
        smaller = dataclasses.replace(job, frames_per_chunk=chunk)
        if with_margin(smaller.need()) <= available:
            return smaller
    return None


def _index_safe_chunk(job: DecodeJob) -> int | None:
    """The most frames per chunk (at most ``job``'s) whose convolutions stay within
    :data:`INDEX_LIMIT` at ``job``'s tile size, or None when not even one frame does.

    The traced sizes grow about linearly with the chunk: the guess from chunks 1 and 2 is
    checked by its own trace and lowered until it holds."""
    def conv(chunk: int) -> int:
        return dataclasses.replace(job, frames_per_chunk=chunk).largest_conv()

    largest = min(job.frames_per_chunk or job.latent_shape[2], job.latent_shape[2])
    one, two = conv(1), conv(2)
    if one > INDEX_LIMIT:
        return None
    chunk = largest if two <= one else min(largest, 1 + (INDEX_LIMIT - one) // (two - one))
    while chunk > 1 and conv(chunk) > INDEX_LIMIT:
        chunk -= 1
    return chunk


def index_safe_decode(job: DecodeJob) -> DecodeJob:
    """``job`` with the most frames per chunk, then (if one frame is too many) the largest tile
    of :data:`DECODE_TILES`, whose convolutions stay within :data:`INDEX_LIMIT` elements.

    Raises:
        InsufficientMemoryError: when not even the smallest tile does.
    """
    if job.largest_conv() <= INDEX_LIMIT:
        return job
    candidates = [job] + [
        dataclasses.replace(job, tile=px // 8, overlap=job.overlap or min(8, px // 32))
        for px in DECODE_TILES if job.tile is None or px // 8 < job.tile
    ]  # fmt: skip
    for candidate in candidates:
        chunk = _index_safe_chunk(candidate)
        if chunk is not None:
            safe = dataclasses.replace(candidate, frames_per_chunk=chunk)
            log.warning("decoding %d latent frames per chunk (tile %s) instead of %s (tile %s): "
                        "larger convolutions pass the 2^31 elements CUDA kernels index",
                        chunk, safe.tile, job.frames_per_chunk or "all", job.tile)  # fmt: skip
            return safe
    raise InsufficientMemoryError(f"no decode setting keeps the convolutions of latents "
                                  f"{job.latent_shape} under 2^31 elements")  # fmt: skip


def check_decode(job: DecodeJob, device: torch.device | str) -> DecodeJob:
    """The job to run: ``job`` itself when it fits, else the same with smaller frame chunks
    (exact), else :class:`InsufficientMemoryError` naming the tile sizes that would fit.

    Off the CPU the chunk (then the tile) is first bounded so that no convolution passes
    :data:`INDEX_LIMIT` elements (:func:`index_safe_decode`); the CPU kernels index with 64 bits.
    """
    if torch.device(device).type != "cpu":
        job = index_safe_decode(job)
    available, _ = free_bytes(device)
    if available is None:
        log.info("free memory of %s unknown; decoding without a memory check", device)
        return job
    fits = fitting_decode(job, available)
    if fits is not None:
        if fits.frames_per_chunk != job.frames_per_chunk:
            log.warning("decoding %d latent frames per chunk instead of %s to fit in %s "
                        "(the result is the same)", fits.frames_per_chunk,
                        job.frames_per_chunk or "all", gib(available))  # fmt: skip
        return fits
    _, _, T, h, w = job.latent_shape
    options = []
    for px in DECODE_TILES:
        if job.tile is not None and px // 8 >= job.tile or px // 8 >= max(h, w):
            continue
        tiled = fitting_decode(dataclasses.replace(job, tile=px // 8, overlap=min(8, px // 32)),
                               available)
        if tiled is not None:
            options.append(f"tile_size {px} (with frame_chunk {tiled.frames_per_chunk}; or "
                           f"--decode-tile {px}): {gib(with_margin(tiled.need()))}")
            break
    smallest = dataclasses.replace(job, frames_per_chunk=1)
    tiles = "" if job.tile is None else f" with {job.tile * 8} px tiles"
    raise InsufficientMemoryError(
        f"decoding latents {T}×{h}×{w} to {decoded_frames(T)} frames of {w * 8}×{h * 8} needs "
        f"about {gib(with_margin(smallest.need()))} on {device} even one latent frame at a time"
        f"{tiles} (the {gib(job.output_bytes())} output included) but only {gib(available)} is free"
        f"{_limit_note()}. "
        + _options_text(options, "fewer frames or a smaller size"))


# --------------------------------------------------------------------------------------------


def _limit_note() -> str:
    limit = memory_limit()
    return f" (limited by {LIMIT_ENV}={os.environ[LIMIT_ENV]})" if limit is not None else ""


def _options_text(options: Sequence[str], last_resort: str) -> str:
    if not options:
        return f"No tiling or offload setting fits; use {last_resort}."
    return "Options that would fit: " + "; ".join(options) + f"; or {last_resort}."
