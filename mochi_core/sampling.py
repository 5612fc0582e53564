"""Euler sampling of Mochi's flow-matching ODE with classifier-free guidance (SPEC §4).

Conventions (docs/ARCHITECTURE.md): latents are in DiT space, ``B × 12 × T × h × w``;
``σ = 1`` is noise, ``σ = 0`` data; the model returns the velocity ``v ≈ x₀ − ε`` (toward data),
so one Euler step is ``z ← z + (σᵢ − σᵢ₊₁)·v̂`` and the data estimate is ``x₀ ≈ z + σ·v̂``.
The sampler state and the CFG combination are fp32.

Noise is drawn on the **CPU** from the caller's ``torch.Generator`` in fp32 and then moved to the
device, so a seed gives the same video on every device and backend. It cannot reproduce videos
made by Genmo's reference code, which draws its noise from the global CUDA RNG.

Non-finite values: the guided velocity is checked once per step; NaN/Inf (e.g. an fp16
overflow) raises :class:`mochi_core.finite.NonFiniteError` naming the step and the dtype.

Cancellation: ``callback`` may raise (e.g. an "interrupted" exception); the exception propagates
out of :func:`sample` after the current step and nothing else is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from . import memory
from .finite import check_dit_step
from .text import TextConditioning
from .tiled_sampling import TiledModel, TileOptions

log = logging.getLogger(__name__)

LATENT_CHANNELS = 12
#: Largest noise seed: the range ``torch.Generator.manual_seed`` takes (0 .. 2**64 - 1), shared by
#: the nodes, the pipeline and the CLI.
MAX_SEED = 2**64 - 1

#: ``callback(step, total, preview)``: ``step`` completed steps out of ``total``; ``preview`` is
#: the fp32 x₀ estimate ``z + σ·v̂`` in DiT space (``B × 12 × T × h × w``); turn it into frames
#: with :func:`latent_preview_rgb`.
Callback = Callable[[int, int, torch.Tensor], None]

#: 12 × 3 factors mapping DiT-space latents to rough RGB in [−1, 1] (SPEC §8 item 21).
PREVIEW_RGB_FACTORS = (
    (-0.0069, -0.0045, 0.0018), (0.0154, -0.0692, -0.0274), (0.0333, 0.0019, 0.0206),
    (-0.1390, 0.0628, 0.1678), (-0.0725, 0.0134, -0.1898), (0.0074, -0.0270, -0.0209),
    (-0.0176, -0.0277, -0.0221), (0.5294, 0.5204, 0.3852), (-0.0326, -0.0446, -0.0143),
    (-0.0659, 0.0153, -0.0153), (0.0185, -0.0217, 0.0014), (-0.0396, -0.0495, -0.0281),
)  # fmt: skip
PREVIEW_RGB_BIAS = (-0.0940, -0.1418, -0.1453)


class ModelFn(Protocol):
    """A velocity model: ``AsymmDiT.forward`` or a wrapper such as a tiled sampler.

    Args:
        x: ``B × 12 × T × h × w`` fp32 latents in DiT space.
        sigma: ``B`` fp32 noise levels (1 = noise).
        y_feat: ``B × L × D`` T5 features.
        y_mask: ``B × L`` bool mask of real text tokens (a prefix of each row).

    Returns:
        ``B × 12 × T × h × w`` velocity ``x₀ − ε``.
    """

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, y_feat: torch.Tensor, y_mask: torch.Tensor
    ) -> torch.Tensor: ...


def _check_sigmas(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(f"sigmas needs at least 2 values (1 step), got {len(values)}")
    if not all(0.0 <= s <= 1.0 for s in values):
        raise ValueError("sigmas must lie in [0, 1]")
    if any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("sigmas must be strictly decreasing")
    return values


def _cfg_per_step(cfg: float | Sequence[float], steps: int) -> list[float]:
    scales = [float(cfg)] * steps if isinstance(cfg, (int, float)) else [float(c) for c in cfg]
    if len(scales) != steps:
        raise ValueError(f"cfg schedule has {len(scales)} values for {steps} steps")
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"cfg values must be finite, got {scales}")
    return scales


def _model_device(model: ModelFn) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    device = getattr(model, "device", None)  # wrappers such as TiledModel say where they run
    return device if isinstance(device, torch.device) else torch.device("cpu")


def compute_dtype(model: ModelFn) -> torch.dtype | None:
    """The dtype the model computes in (``AsymmDiT.resolved_compute_dtype``), for messages."""
    resolve = getattr(model, "resolved_compute_dtype", None)
    if callable(resolve):
        return resolve()
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.dtype
    return getattr(model, "dtype", None)


def initial_latents(
    latents_or_shape: torch.Tensor | Sequence[int],
    sigma0: float,
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """The sampler's starting point ``z = σ₀·noise + (1 − σ₀)·latents`` (fp32, on ``device``).

    Args:
        latents_or_shape: DiT-space latents ``B × 12 × T × h × w`` to start from (e.g. an
            encoded video for video-to-video), or just that shape (latents of zeros).
        sigma0: the first sigma of the schedule; 1.0 gives pure noise.
        generator: a CPU generator; the noise is drawn on the CPU in fp32, then moved.
    """
    if generator.device.type != "cpu":
        raise ValueError("the noise generator must be a CPU torch.Generator (reproducibility)")
    latents = latents_or_shape if isinstance(latents_or_shape, torch.Tensor) else None
    shape = tuple(latents.shape if latents is not None else latents_or_shape)
    if len(shape) != 5 or shape[1] != LATENT_CHANNELS or min(shape) < 1:
        raise ValueError(f"latents must be B × 12 × T × h × w, got {shape}")
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    z = noise.to(device)
    if latents is not None and sigma0 < 1.0:
        z = sigma0 * z + (1.0 - sigma0) * latents.to(device=device, dtype=torch.float32)
    return z


def guided_velocity(
    model: ModelFn,
    z: torch.Tensor,
    sigma: float,
    positive: TextConditioning,
    negative: TextConditioning | None,
    scale: float,
    batch_cfg: bool,
) -> torch.Tensor:
    """``v̂ = v_u + s·(v_c − v_u)`` in fp32; one conditional pass only when ``s == 1``.

    With ``batch_cfg`` cond and uncond run as one ``2B`` batch ordered ``[cond, uncond]``.
    """
    b = z.shape[0]
    sig = torch.full((b,), sigma, dtype=torch.float32, device=z.device)
    if scale == 1.0 or negative is None:
        return model(z, sig, positive.features, positive.mask).float()
    if batch_cfg:
        both = TextConditioning.cat([positive, negative])
        v = model(torch.cat([z, z]), torch.cat([sig, sig]), both.features, both.mask).float()
        v_cond, v_uncond = v.chunk(2)
    else:
        v_cond = model(z, sig, positive.features, positive.mask).float()
        v_uncond = model(z, sig, negative.features, negative.mask).float()
    return v_uncond + scale * (v_cond - v_uncond)


def supports_batched_text(model: ModelFn) -> bool:
    """Whether ``model`` can run one batch whose rows have different text lengths.

    A model (or wrapper) says so with a ``supports_batched_text`` attribute; otherwise the
    ``ragged_batch`` flag of its attention backend (``AsymmDiT.attention``) decides. Without
    either the answer is False and CFG runs as two passes, which is always correct.
    """
    flag = getattr(model, "supports_batched_text", None)
    if flag is None:
        flag = getattr(getattr(model, "attention", None), "ragged_batch", False)
    return bool(flag)


def memory_job(
    model: ModelFn, latents_or_shape: torch.Tensor | Sequence[int],
    positive: TextConditioning, negative: TextConditioning | None,
    cfg: float | Sequence[float], steps: int, batch_cfg: bool | None,
    tiling: TileOptions | None,
) -> memory.DiTJob | None:
    """What one step of :func:`sample` with these arguments asks of memory (for
    :func:`mochi_core.memory.check_dit`); None when ``model`` is not an ``AsymmDiT``."""
    shape = getattr(latents_or_shape, "shape", latents_or_shape)
    batched = supports_batched_text(model) if batch_cfg is None else batch_cfg
    uncond = negative is not None and any(s != 1.0 for s in _cfg_per_step(cfg, steps))
    return memory.dit_job(model, tuple(shape), [positive, negative], batched and uncond, tiling)


def sample(
    model: ModelFn,
    *,
    latents_or_shape: torch.Tensor | Sequence[int],
    positive: TextConditioning,
    negative: TextConditioning | None,
    sigmas: Sequence[float] | torch.Tensor,
    cfg: float | Sequence[float],
    generator: torch.Generator,
    callback: Callback | None = None,
    batch_cfg: bool | None = None,
    device: torch.device | str | None = None,
    tiling: TileOptions | None = None,
    check_memory: bool = True,
) -> torch.Tensor:
    """Sample DiT-space latents with Euler steps over ``sigmas`` and classifier-free guidance.

    Args:
        model: the velocity model (see :class:`ModelFn`).
        latents_or_shape: ``(B, 12, T, h, w)`` to start from noise, or DiT-space latents to
            denoise partially (``z = σ₀·noise + (1 − σ₀)·latents``, use a schedule from
            :func:`mochi_core.schedule.denoise_schedule`).
        positive / negative: prompt conditionings with batch 1 or B. ``negative`` may be None
            only if every cfg value is 1.
        sigmas: S + 1 strictly decreasing noise levels, normally ending with 0.
        cfg: guidance scale, or one per step (length S); steps with scale 1 skip the uncond pass.
        generator: CPU generator for the noise.
        callback: ``callback(step, total, x0_estimate)`` after each step; raise in it to cancel.
        batch_cfg: run cond and uncond as one batch; None picks it when the model supports
            different text lengths in one batch (:func:`supports_batched_text`).
        device: where to sample; default the latents' device, else the model's.
        tiling: run the model on overlapping tiles blended per step
            (:class:`mochi_core.tiled_sampling.TiledModel`); None (default) runs it whole.
        check_memory: before anything is allocated, estimate the memory of a step of an
            :class:`~mochi_core.dit.AsymmDiT` and raise
            :class:`~mochi_core.memory.InsufficientMemoryError` (with the options that would
            fit) when ``device`` cannot hold it (:mod:`mochi_core.memory`).

    Returns:
        ``B × 12 × T × h × w`` fp32 latents in DiT space.
    """
    sig = _check_sigmas(sigmas)
    steps = len(sig) - 1
    scales = _cfg_per_step(cfg, steps)
    if negative is None and any(s != 1.0 for s in scales):
        raise ValueError("a negative conditioning is needed when cfg != 1")
    if device is None:
        is_tensor = isinstance(latents_or_shape, torch.Tensor)
        device = latents_or_shape.device if is_tensor else _model_device(model)
    batched = supports_batched_text(model) if batch_cfg is None else batch_cfg
    dtype = compute_dtype(model)
    if check_memory and (job := memory_job(model, latents_or_shape, positive, negative, cfg,
                                           steps, batch_cfg, tiling)) is not None:  # fmt: skip
        memory.check_dit(job, device, memory.weight_bytes_on(model, device))
    # Caches the model keeps across steps (the DiT's RoPE rotation, 547 MB at 848x480x163)
    # are dropped when sampling ends, cancelled or not, so they do not outlive the run.
    release = getattr(model, "release_caches", None)
    if tiling is not None:
        model = TiledModel(model, tiling)
    try:
        z = initial_latents(latents_or_shape, sig[0], generator, device)
        pos = positive.expand(z.shape[0]).to(device)
        neg = negative.expand(z.shape[0]).to(device) if negative is not None else None
        log.info("sampling %d steps, latents %s, batch_cfg=%s, tiling=%s", steps,
                 tuple(z.shape), batched, tiling)  # fmt: skip
        with torch.no_grad():
            for i in range(steps):
                v = guided_velocity(model, z, sig[i], pos, neg, scales[i], batched)
                check_dit_step(v, i + 1, steps, dtype)
                if callback is not None:
                    callback(i + 1, steps, z + sig[i] * v)
                z = z + (sig[i] - sig[i + 1]) * v
        return z
    finally:
        if callable(release):
            release()


def latent_preview_rgb(z: torch.Tensor, as_uint8: bool = True) -> torch.Tensor:
    """A cheap RGB preview of DiT-space latents through a fixed 12 × 3 projection (§8.21).

    Args:
        z: ``B × 12 × T × h × w`` (the first item is previewed) or ``12 × T × h × w``.
        as_uint8: return uint8 in [0, 255]; otherwise float in [0, 1].

    Returns:
        ``T × h × w × 3`` frames at latent resolution (1/8 of the video size).
    """
    if z.ndim == 5:
        z = z[0]
    if z.ndim != 4 or z.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"expected 12 × T × h × w latents, got {tuple(z.shape)}")
    factors = torch.tensor(PREVIEW_RGB_FACTORS, dtype=torch.float32, device=z.device)
    bias = torch.tensor(PREVIEW_RGB_BIAS, dtype=torch.float32, device=z.device)
    rgb = torch.einsum("cthw,cr->thwr", z.float(), factors) + bias
    rgb = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
    return (rgb * 255.0).round().to(torch.uint8) if as_uint8 else rgb
