"""Text → video with Mochi 1, in three stages that each load, use and free one model.

1. T5 encodes the prompt and the negative prompt (fp32 on the CPU by default, SPEC §5);
2. the DiT samples DiT-space latents (:func:`mochi_core.sampling.sample`);
3. the decoder turns them into pixels, streamed in time (:func:`mochi_core.vae_tiling.decode`).

Only one model is resident at a time, so peak memory is that of the largest stage.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ops
from .sampling import MAX_SEED, sample
from .sampling import Callback as SampleCallback
from .schedule import DEFAULT_THRESHOLD_NOISE, linear_quadratic_schedule
from .text import T5Conditioner, TextConditioning, prompt_problem
from .tiled_sampling import TileOptions

log = logging.getLogger(__name__)

DecodeCallback = Callable[[int, int], None]

#: The ranges of a generation, shared by the CLI, the sampler and the save node:
#: sides in pixels (multiples of 16), frames (6k+1), steps, guidance, the file's frame rate.
MIN_SIZE, MAX_SIZE = 16, 4096
MIN_FRAMES, MAX_FRAMES = 7, 6 * 60 + 1
MAX_STEPS = 1000
MAX_CFG = 30.0
MIN_FPS, MAX_FPS = 1.0, 60.0


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate (defaults: Genmo's CLI, SPEC §4.4)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 848
    height: int = 480
    frames: int = 163
    steps: int = 64
    cfg: float = 6.0
    seed: int = 1710977262
    threshold_noise: float = DEFAULT_THRESHOLD_NOISE
    zero_empty_negative: bool = True

    def problems(self) -> dict[str, str]:
        """Invalid settings, ``{name: message}`` (empty when everything is valid)."""
        out = {}
        for name in ("prompt", "negative_prompt"):
            if problem := prompt_problem(name, getattr(self, name)):
                out[name] = problem.removeprefix(f"{name} ")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or not MIN_SIZE <= value <= MAX_SIZE or value % 16:
                out[name] = (f"must be a positive multiple of 16 up to {MAX_SIZE} (e.g. 848×480), "
                             f"got {value}")
        out |= self._frame_problems()
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            out["steps"] = f"must be an integer from 1 to {MAX_STEPS}, got {self.steps}"
        if not 0 <= self.cfg <= MAX_CFG:  # also refuses NaN
            out["cfg"] = f"must be from 0 to {MAX_CFG:g} (1 disables guidance), got {self.cfg}"
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            out["seed"] = f"must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {self.seed}"
        if not 0 < self.threshold_noise < 1:
            out["threshold_noise"] = f"must be in (0, 1), got {self.threshold_noise}"
        return out

    def _frame_problems(self) -> dict[str, str]:
        """``frames`` must be 6k+1 within the range; the message names the nearest values."""
        frames = self.frames
        if _is_int(frames) and MIN_FRAMES <= frames <= MAX_FRAMES and (frames - 1) % 6 == 0:
            return {}
        if not _is_int(frames):
            return {"frames": f"must be an integer 6k+1 from {MIN_FRAMES} to {MAX_FRAMES}, "
                              f"got {frames!r}"}  # fmt: skip
        k = min(max(1, (frames - 1) // 6), (MAX_FRAMES - 1) // 6 - 1)
        return {"frames": f"must be 6k+1 from {MIN_FRAMES} to {MAX_FRAMES} (7, 13, …, 163, …), "
                          f"got {frames}; nearest: {6 * k + 1} or {6 * k + 7}"}  # fmt: skip

    def validate(self) -> None:
        """Raise ``ValueError`` listing every invalid setting."""
        if problems := self.problems():
            raise ValueError("; ".join(f"{k} {v}" for k, v in problems.items()))

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """``(1, 12, T, h, w)``: 6k+1 frames → k+1 latent frames, ÷8 spatially."""
        return (1, 12, (self.frames - 1) // 6 + 1, self.height // 8, self.width // 8)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class WeightDtype:
    """One storage choice of the DiT (see :data:`WEIGHT_DTYPES`).

    Attributes:
        dtype: the storage dtype of the weights, or None to keep the file's.
        fp8_fast: the fp8 Linear layers multiply in fp8 (:data:`mochi_core.ops.fp8_fast`, and
            the host's own fp8 matmul layers under ComfyUI) instead of casting their weights up.
    """

    dtype: torch.dtype | None
    fp8_fast: bool = False


#: The DiT's storage choices by name: the CLI's ``--weight-dtype`` and the loader node's
#: ``weight_dtype`` (whose names follow the host's own model loader).
WEIGHT_DTYPES = {
    "default": WeightDtype(None),
    "bf16": WeightDtype(torch.bfloat16),
    "fp8_e4m3fn": WeightDtype(torch.float8_e4m3fn),
    "fp8_e4m3fn_fast": WeightDtype(torch.float8_e4m3fn, fp8_fast=True),
    "fp32": WeightDtype(torch.float32),
}


@dataclass(frozen=True)
class DiTOptions:
    """How the DiT is stored and run (every option off by default).

    Attributes:
        dtype: storage dtype of the weights (None keeps the file's; bf16, fp8_e4m3fn, fp32);
            they are cast layer by layer at compute time.
        fp8_fast: the fp8_e4m3fn Linear weights multiply in fp8 instead of being cast
            (:data:`mochi_core.ops.fp8_fast`); needs ``dtype`` fp8_e4m3fn, or None with an fp8
            file.
        attention: ``"sdpa"``, ``"flash"`` or ``"sage"`` (falls back to sdpa when unavailable).
        tiling: sample on overlapping tiles (:class:`~mochi_core.tiled_sampling.TileOptions`).
        offload_resident: keep at most this many transformer blocks on the device and stream
            the others from CPU memory (:func:`mochi_core.offload.offload_blocks`); None = off.
        compile_backend: ``torch.compile`` the blocks with this backend (``"inductor"``);
            None = off; falls back to eager with a logged reason.
    """

    dtype: torch.dtype | None = None
    fp8_fast: bool = False
    attention: str = "sdpa"
    tiling: TileOptions | None = None
    offload_resident: int | None = None
    compile_backend: str | None = None

    def problems(self) -> dict[str, str]:
        """Invalid options, ``{name: message}``."""
        out = {}
        if self.tiling is not None and not isinstance(self.tiling, TileOptions):
            out["tiling"] = f"must be a TileOptions or None, got {type(self.tiling).__name__}"
        if self.fp8_fast and self.dtype not in (None, torch.float8_e4m3fn):
            out["fp8_fast"] = f"needs fp8_e4m3fn storage (or the file's fp8), not {self.dtype}"
        if self.offload_resident is not None and self.offload_resident < 1:
            out["offload_resident"] = f"must be >= 1 block (or None), got {self.offload_resident}"
        return out


@dataclass(frozen=True)
class CheckpointPaths:
    """Files of one model set; ``tokenizer`` None searches for ComfyUI's T5 tokenizer."""

    dit: Path
    vae: Path
    t5: Path
    tokenizer: Path | None = None


@dataclass
class GenerationResult:
    """Frames ``F × H × W × 3`` uint8, the DiT-space latents and seconds per stage."""

    frames: torch.Tensor
    latents: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output ``B × 3 × F × H × W`` in [-1, 1] → ``F × H × W × 3`` uint8 of item 0."""
    frames = ((pixels[0].float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (frames * 255.0).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def encode_prompts(
    paths: CheckpointPaths, settings: GenerationSettings
) -> tuple[TextConditioning, TextConditioning | None]:
    """Positive and (when cfg != 1) negative conditioning; T5 is freed afterwards."""
    text = T5Conditioner.from_file(paths.t5, paths.tokenizer)
    positive = text.encode(settings.prompt)
    negative = None
    if settings.cfg != 1.0:
        negative = text.encode(settings.negative_prompt, zero_empty=settings.zero_empty_negative)
    del text
    gc.collect()
    return positive, negative


def _prepared_dit(paths: CheckpointPaths, options: DiTOptions, device: torch.device):
    """Load the DiT with ``options``: on the device, or on the CPU with blocks streamed."""
    from .checkpoints import load_dit  # noqa: PLC0415
    from .compile import compile_blocks  # noqa: PLC0415
    from .offload import offload_blocks  # noqa: PLC0415

    offload = options.offload_resident is not None
    dit = load_dit(paths.dit, dtype=options.dtype, device="cpu" if offload else device,
                   attention=options.attention,
                   operations=ops.fp8_fast if options.fp8_fast else ops.cast)  # fmt: skip
    if offload:
        offload_blocks(dit, resident=options.offload_resident, device=device)
    if options.compile_backend is not None:
        compile_blocks(dit, backend=options.compile_backend)
    return dit


def sample_latents(
    paths: CheckpointPaths, settings: GenerationSettings,
    conds: tuple[TextConditioning, TextConditioning | None], *, device: torch.device,
    options: DiTOptions = DiTOptions(), callback: SampleCallback | None = None,
) -> torch.Tensor:  # fmt: skip
    """Load the DiT, sample ``1 × 12 × T × h × w`` fp32 DiT-space latents, free the DiT."""
    dit = _prepared_dit(paths, options, device)
    width, expected = conds[0].features.shape[-1], dit.config.t5_feat_dim
    if width != expected:
        raise ValueError(f"the text encoder gives {width}-d features but the DiT {paths.dit} "
                         f"expects {expected}-d (T5-XXL: 4096); are the checkpoints a set?")
    latents = sample(
        dit, latents_or_shape=settings.latent_shape, positive=conds[0], negative=conds[1],
        sigmas=linear_quadratic_schedule(settings.steps, settings.threshold_noise),
        cfg=settings.cfg, generator=torch.Generator().manual_seed(settings.seed),
        callback=callback, device=device, tiling=options.tiling,
    )  # fmt: skip
    del dit
    _free(device)
    return latents


def decode_latents(
    paths: CheckpointPaths, latents: torch.Tensor, *, device: torch.device,
    frames_per_chunk: int | None = None, tile_size: int | None = None,
    callback: DecodeCallback | None = None,
) -> torch.Tensor:  # fmt: skip
    """Load the decoder and decode DiT-space latents to ``F × H × W × 3`` uint8 frames (fp32)."""
    from .checkpoints import load_vae  # noqa: PLC0415
    from .vae import dit_to_vae_latents  # noqa: PLC0415
    from .vae_tiling import decode  # noqa: PLC0415

    decoder = load_vae(paths.vae, device=device).decoder
    if decoder is None:
        raise ValueError(f"{paths.vae}: no VAE decoder in this file")
    z_vae = dit_to_vae_latents(latents.to(device, torch.float32))
    pixels = decode(decoder, z_vae, frames_per_chunk=frames_per_chunk, tile_size=tile_size,
                    callback=callback)  # fmt: skip
    del decoder
    _free(device)
    return pixels_to_uint8(pixels).cpu()


def generate(
    paths: CheckpointPaths, settings: GenerationSettings, *,
    device: torch.device | str = "cpu", dit: DiTOptions = DiTOptions(),
    frames_per_chunk: int | None = None, tile_size: int | None = None,
    sample_callback: SampleCallback | None = None,
    decode_callback: DecodeCallback | None = None,
) -> GenerationResult:  # fmt: skip
    """Generate a video: prompts → latents → ``F × H × W × 3`` uint8 frames.

    Args:
        paths: the DiT, VAE and T5 checkpoints (any format :mod:`mochi_core.checkpoints` reads).
        settings: validated first; nothing is loaded when they are invalid.
        device: where the DiT and the decoder run (T5 runs in fp32 on the CPU).
        dit: storage dtype, attention backend, tiling, block offload and compile of the DiT;
            validated before anything is loaded.
        frames_per_chunk / tile_size: decoder streaming and spatial tiling (latent units).
        sample_callback: ``(step, total, x0_preview)`` per sampler step (raise to cancel).
        decode_callback: ``(done, total)`` per decoded chunk/tile.
    """
    settings.validate()
    if problems := dit.problems():
        raise ValueError("; ".join(f"dit.{k} {v}" for k, v in problems.items()))
    device = torch.device(device)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    conds = encode_prompts(paths, settings)
    seconds["text"] = time.perf_counter() - start
    latents = sample_latents(paths, settings, conds, device=device, options=dit,
                             callback=sample_callback)  # fmt: skip
    seconds["sample"] = time.perf_counter() - start - seconds["text"]
    frames = decode_latents(paths, latents, device=device, frames_per_chunk=frames_per_chunk,
                            tile_size=tile_size, callback=decode_callback)  # fmt: skip
    seconds["decode"] = time.perf_counter() - start - seconds["text"] - seconds["sample"]
    log.info("generated %d frames %dx%d in %.1f s", frames.shape[0], frames.shape[2],
             frames.shape[1], sum(seconds.values()))  # fmt: skip
    return GenerationResult(frames, latents.cpu(), seconds)
