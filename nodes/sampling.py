"""The sampler node: Genmo's Euler flow sampler with CFG on the linear-quadratic schedule."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from mochi_core import memory, sampling, schedule, text, vae
from mochi_core.pipeline import MAX_CFG, MAX_STEPS
from mochi_core.tiled_sampling import ROPE_MODES, TileOptions

from ._shared import (
    CATEGORY,
    MAX_FRAMES,
    MAX_SIZE,
    MochiModel,
    MochiTiling,
    StepProgress,
    choice_error,
    first_error,
    first_message,
    frames_error,
    latent_error,
    require,
    schema_error,
    size_error,
)

BATCH_CFG = {"auto": None, "batched": True, "separate": False}
#: Longest cfg_schedule: one value of up to seven characters per step at the most steps.
MAX_CFG_SCHEDULE = 8 * MAX_STEPS


def parse_cfg_schedule(spec: str, steps: int) -> list[float] | None:
    """``"6, 6, 4.5"`` → one CFG per step (linearly interpolated); empty → None (constant)."""
    values = [float(v) for v in spec.replace(";", ",").split(",") if v.strip()]
    if not values:
        return None
    if len(values) == 1:
        return values * steps
    pos = torch.linspace(0, len(values) - 1, steps)
    table = torch.tensor(values, dtype=torch.float64)
    low = pos.floor().long().clamp(max=len(values) - 2)
    return (table[low] + (pos - low) * (table[low + 1] - table[low])).tolist()


def cfg_schedule_error(spec: str | None) -> str | None:
    """A message when ``spec`` (already at most :data:`MAX_CFG_SCHEDULE` characters) is not
    a list of numbers between 0 and 30."""
    if spec is None:
        return None
    try:
        values = [float(v) for v in spec.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        return (f"cfg_schedule must be empty or comma-separated numbers such as '6, 6, 4.5'; "
                f"got {spec!r}")
    bad = [v for v in values if not 0.0 <= v <= MAX_CFG]  # also NaN and inf
    return f"cfg_schedule values must be between 0 and {MAX_CFG:g}; got {bad[:8]}" if bad else None


def linear_steps_error(linear_steps: int | None, steps: int | None) -> str | None:
    """The linear part of the schedule is shorter than the schedule (0 picks half)."""
    if None in (linear_steps, steps) or linear_steps < steps:
        return None
    return f"linear_steps must be 0 (auto) or below steps ({steps}); got {linear_steps}"


def conditioning_error(name: str, cond, width: int) -> str | None:
    """A message when ``cond`` (a CONDITIONING input) does not hold ``B × L × width`` text
    features, e.g. CLIP features of an image model instead of T5-XXL ones."""
    try:
        features = cond[0][0]
        shape = tuple(features.shape)
    except (TypeError, IndexError, KeyError, AttributeError):
        return f"{name}: expected CONDITIONING from a text encoder; got {type(cond).__name__}"
    if len(shape) == 3 and shape[2] == width and shape[0] >= 1:
        return None
    return (f"{name}: the conditioning holds features of shape {'×'.join(map(str, shape))}; this "
            f"DiT reads T5-XXL features B × L × {width}: use Mochi 1 Text Encode, or the host's "
            f"CLIPLoader with type 'mochi' and CLIPTextEncode")


#: Conditioning options of the host that Mochi 1 Sampler cannot honour, with their defaults.
UNSUPPORTED = {"area": None, "mask": None, "control": None, "gligen": None, "hooks": None,
               "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}


def _is_default(value, default) -> bool:
    return value is None if default is None else value == default


def conditioning_to_text(cond: list, name: str = "conditioning") -> text.TextConditioning:
    """Host CONDITIONING → features and a boolean token mask, as Mochi 1 Text Encode, the
    host's CLIPTextEncode, ConditioningZeroOut, ConditioningAverage and ConditioningConcat
    make it.

    ConditioningConcat keeps the first conditioning's mask: the rows it appended are real
    tokens, except all-zero rows (the padding that Mochi 1 Text Encode zeroes). Real tokens
    need not be a prefix (:meth:`TextConditioning.packed`). Several conditionings
    (ConditioningCombine) and areas, masks, strengths or step ranges are refused with a message
    naming them, before the model is placed on the device.
    """
    if len(cond) != 1:
        raise ValueError(f"{name}: {len(cond)} conditionings (from ConditioningCombine?); Mochi 1 "
                         "Sampler takes one: join the prompts with ConditioningConcat or "
                         "ConditioningAverage, or write them as one prompt")
    features, extra = cond[0]
    unsupported = [k for k, default in UNSUPPORTED.items()
                   if not _is_default(extra.get(k, default), default)]
    if unsupported:
        raise ValueError(f"{name}: Mochi 1 Sampler applies a conditioning to the whole video at "
                         f"every step; it cannot honour {', '.join(unsupported)}")
    batch, length = features.shape[:2]
    mask = extra.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else \
        mask.reshape(batch, -1).bool()
    mask = mask.to(features.device)
    if mask.shape[1] > length:
        raise ValueError(f"{name}: an attention mask of {mask.shape[1]} tokens for "
                         f"{length} feature rows")
    appended = features[:, mask.shape[1]:].float().abs().amax(dim=-1) > 0
    return text.TextConditioning.packed(features.float(), torch.cat([mask, appended], dim=1))


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1Sampler",
            display_name="Mochi 1 Sampler",
            category=f"{CATEGORY}/sampling",
            description="Generates Mochi 1 video latents: Euler steps on Genmo's linear-quadratic "
                        "sigma schedule with classifier-free guidance. Starts from noise of the "
                        "given size, or from a LATENT (its size; its content when denoise < 1).",
            inputs=[
                MochiModel.Input("model", tooltip="From Mochi 1 DiT Loader."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning (Mochi 1 Text "
                                      "Encode, or the host's CLIPLoader(type=mochi) + "
                                      "CLIPTextEncode)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt conditioning."),
                io.Int.Input("width", default=848, min=16, max=MAX_SIZE, step=16,
                             tooltip="Video width in pixels, a multiple of 16 (ignored when a "
                                     "latent is connected)."),
                io.Int.Input("height", default=480, min=16, max=MAX_SIZE, step=16,
                             tooltip="Video height in pixels, a multiple of 16 (ignored when a "
                                     "latent is connected)."),
                io.Int.Input("frames", default=163, min=7, max=MAX_FRAMES, step=6,
                             tooltip="Number of frames, 6k+1 (163 is Genmo's default: 5.4 s at "
                                     "30 fps); ignored when a latent is connected."),
                io.Int.Input("steps", default=64, min=1, max=MAX_STEPS,
                             tooltip="Sampling steps (Genmo: 64)."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (Genmo's CLI: 6.0; "
                                       "diffusers and others use 4.5). 1.0 skips the negative."),
                io.Int.Input("seed", default=0, min=0, max=sampling.MAX_SEED,
                             control_after_generate=True,
                             tooltip="Seed of the initial noise (drawn on the CPU in fp32, so a "
                                     "seed gives the same video on any device)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1.0 generates from noise; below 1 keeps the input "
                                       "latent's content (video-to-video)."),
                io.Float.Input("threshold_noise", default=0.025, min=0.001, max=0.999,
                               step=0.001, round=0.0001,
                               tooltip="Schedule: 1 − σ reached at the end of its linear part."),
                io.Int.Input("linear_steps", default=0, min=0, max=MAX_STEPS,
                             tooltip="Schedule: steps in the linear part (0 = half the steps)."),
                io.String.Input("cfg_schedule", default="",
                                tooltip="Optional per-step CFG: comma-separated values "
                                        "interpolated over the steps (e.g. '6, 4.5'); empty "
                                        f"uses the constant cfg. At most {MAX_CFG_SCHEDULE:,} "
                                        "characters."),
                io.Combo.Input("batch_cfg", options=list(BATCH_CFG), default="auto",
                               tooltip="Run the positive and negative passes as one batch "
                                       "(faster, more memory) or separately. 'auto' batches "
                                       "with the sdpa and flash attention backends, which "
                                       "take prompts of different lengths in one batch (on a "
                                       "GPU each prompt's attention runs unmasked, so the "
                                       "fast kernels apply), and runs them separately with "
                                       "sage."),
                MochiTiling.Input("tiling", optional=True,
                                  tooltip="Optional: run the DiT on overlapping tiles (Mochi 1 "
                                          "DiT Tiling) to bound memory on large videos."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional start: EmptyMochiLatentVideo for its size, or "
                                        "Mochi 1 VAE Encode for video-to-video."),
            ],
            outputs=[io.Latent.Output(
                tooltip="Video latents in the host's Mochi convention (VAE space, "
                        "B × 12 × T × H/8 × W/8): decodable by Mochi 1 VAE Decode or the "
                        "host's VAEDecode / VAEDecodeTiled.")],
        )

    #: Caps of text inputs below the pack's default (see ``_shared.schema_error``).
    MAX_CHARS = {"cfg_schedule": MAX_CFG_SCHEDULE}

    @classmethod
    def validate_inputs(cls, width=None, height=None, frames=None, steps=None, cfg=None,
                        seed=None, denoise=None, threshold_noise=None, linear_steps=None,
                        batch_cfg=None, cfg_schedule=None) -> bool | str:
        # the size and frame rules also name the allowed steps, so they speak first; then the
        # schema's limits, so that the rules after them see only in-range, finite numbers
        return (first_message(size_error("width", width), size_error("height", height),
                              frames_error("frames", frames), schema_error(cls, locals()))
                or first_error(linear_steps_error(linear_steps, steps),
                               choice_error("batch_cfg", batch_cfg, list(BATCH_CFG)),
                               cfg_schedule_error(cfg_schedule)))

    @classmethod
    def check_links(cls, model, positive, negative, latent) -> None:
        """The linked inputs, known only now: before anything is loaded or sampled."""
        if latent is not None:
            require(latent_error("latent", latent, even=True))
        width = model.model.module.config.t5_feat_dim
        require(conditioning_error("positive", positive, width) or
                conditioning_error("negative", negative, width))

    @classmethod
    def execute(cls, model, positive, negative, width, height, frames, steps, cfg, seed,
                denoise, threshold_noise, linear_steps, batch_cfg, cfg_schedule="",
                tiling=None, latent=None) -> io.NodeOutput:
        cls.check_links(model, positive, negative, latent)
        start = None if latent is None else latent["samples"].float()
        shape = (1, 12, (frames - 1) // 6 + 1, height // 8, width // 8)
        sigmas = schedule.denoise_schedule(steps, denoise, threshold_noise, linear_steps or None)
        if start is not None and denoise < 1.0:
            start_or_shape = vae.vae_to_dit_latents(start)
        else:
            start_or_shape = tuple(start.shape) if start is not None else shape
        pos = conditioning_to_text(positive, "positive")
        neg = conditioning_to_text(negative, "negative")
        module, cfg = model.model.module, parse_cfg_schedule(cfg_schedule or "", steps) or cfg
        job = sampling.memory_job(module, start_or_shape, pos, neg, cfg, steps,
                                  BATCH_CFG[batch_cfg], tiling)  # fmt: skip
        # Let the host unload other models to make room for the activations too; the sampler
        # then checks the free memory against the same estimate before it allocates anything.
        mm.load_models_gpu([model], memory_required=memory.with_margin(job.need()) if job else 0)
        z = sampling.sample(
            module, latents_or_shape=start_or_shape, positive=pos, negative=neg,
            sigmas=sigmas, cfg=cfg,
            generator=torch.Generator("cpu").manual_seed(seed), batch_cfg=BATCH_CFG[batch_cfg],
            tiling=tiling, device=model.load_device,
            callback=StepProgress(steps, model.load_device))
        return io.NodeOutput({"samples": vae.dit_to_vae_latents(z).to(mm.intermediate_device())})


class DiTTiling(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1DiTTiling",
            display_name="Mochi 1 DiT Tiling",
            category=f"{CATEGORY}/sampling",
            description="Options to run the DiT on overlapping spatial tiles (and temporal "
                        "windows), blended with feathered weights at every step: memory follows "
                        "the tile, not the video. One tile covering the video is the untiled "
                        "model; smaller tiles lose context across tiles.",
            inputs=[
                io.Int.Input("tile_size", default=512, min=16, max=MAX_SIZE, step=16,
                             tooltip="Square tile side in pixels (a multiple of 16)."),
                io.Int.Input("tile_overlap", default=128, min=0, max=MAX_SIZE, step=16,
                             tooltip="Pixels shared by neighbouring tiles (a multiple of 16, "
                                     "below tile_size); blended linearly."),
                io.Int.Input("temporal_window", default=0, min=0, max=64,
                             tooltip="Latent frames per temporal window (0 = all frames at "
                                     "once; 6 pixel frames per latent frame)."),
                io.Int.Input("temporal_overlap", default=2, min=0, max=63,
                             tooltip="Latent frames shared by neighbouring windows (below "
                                     "temporal_window)."),
                io.Combo.Input("rope", options=list(ROPE_MODES), default="canvas",
                               tooltip="RoPE positions of a tile: 'canvas' keeps each token's "
                                       "position on the whole video (exact for one tile); "
                                       "'tile' re-spans every tile as a frame of its own."),
            ],
            outputs=[MochiTiling.Output(
                display_name="tiling",
                tooltip="DiT tiling options for Mochi 1 Sampler (a custom type: only our "
                        "sampler uses them).")],
        )

    @classmethod
    def validate_inputs(cls, tile_size=None, tile_overlap=None, temporal_window=None,
                        temporal_overlap=None, rope=None) -> bool | str:
        return schema_error(cls, locals()) or first_error(
            choice_error("rope", rope, list(ROPE_MODES)),
            *(f"{name} must be a multiple of 16; got {value}"
              for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap))
              if value is not None and value % 16),
            None if None in (tile_size, tile_overlap) or tile_overlap < tile_size else
            f"tile_overlap ({tile_overlap}) must be below tile_size ({tile_size})",
            None if None in (temporal_window, temporal_overlap) or not temporal_window
            or temporal_overlap < temporal_window else
            f"temporal_overlap must be between 0 and temporal_window - 1 "
            f"({temporal_window - 1}); got {temporal_overlap}")

    @classmethod
    def execute(cls, tile_size, tile_overlap, temporal_window, temporal_overlap,
                rope) -> io.NodeOutput:
        side = tile_size // 8
        options = TileOptions(tile=(side, side), overlap=tile_overlap // 8,
                              temporal_window=temporal_window or None,
                              temporal_overlap=temporal_overlap if temporal_window else 0,
                              rope=rope)
        return io.NodeOutput(options)


NODES = [Sampler, DiTTiling]
