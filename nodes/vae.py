"""VAE nodes: LATENT → IMAGE (tiled, streamed) and IMAGE → LATENT."""

from __future__ import annotations

import dataclasses

import comfy.model_management as mm
import torch
from comfy_api.latest import io
from einops import rearrange

from mochi_core import memory, vae_tiling

from ._shared import (
    CATEGORY,
    MAX_SIZE,
    MochiDecoder,
    MochiEncoder,
    StepProgress,
    choice_error,
    first_error,
    image_error,
    latent_error,
    require,
    return_freed_memory,
    schema_error,
)

FRAME_HANDLING = ["trim to 6k+1", "reject"]


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output ``B × 3 × F × H × W`` in [−1, 1] → IMAGE ``(B·F) × H × W × 3`` in [0, 1],
    converted chunk by chunk on the host's intermediate device (:func:`vae_tiling.to_images`)."""
    return vae_tiling.to_images(pixels, mm.intermediate_device())


def image_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``F × H × W × 3`` in [0, 1] → ``1 × 3 × F × H × W`` in [−1, 1] for the encoder."""
    return rearrange(images[..., :3].float() * 2.0 - 1.0, "f h w c -> 1 c f h w")


def require_half(patcher, half: str) -> None:
    """A clear error when the VAE loader's files held no such half."""
    if patcher is None:
        raise ValueError(f"no VAE {half}: the files given to Mochi 1 VAE Loader hold none; add "
                         f"the {half} file (e.g. Genmo's {half}.safetensors) as second_file or "
                         f"use ComfyUI's mochi_vae.safetensors")


def check_frames(images: torch.Tensor, handling: str) -> torch.Tensor:
    """6k+1 frames and sides that are multiples of 16, trimmed or refused with a clear message."""
    frames, height, width = images.shape[0], images.shape[1], images.shape[2]
    if height % 16 or width % 16:
        raise ValueError(f"images are {width}×{height}; Mochi needs width and height in "
                         f"multiples of 16 (resize first, e.g. with ImageScale)")
    valid = (frames - 1) // 6 * 6 + 1
    if valid == frames:
        return images
    if handling == "reject" or valid < 1:
        raise ValueError(f"images have {frames} frames; the Mochi VAE needs 6k+1 frames "
                         f"(1, 7, 13, ...): use {valid} or {valid + 6}, or frame_handling "
                         f"'trim to 6k+1'")
    return images[:valid]


class VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1VAEDecode",
            display_name="Mochi 1 VAE Decode (Tiled)",
            category=f"{CATEGORY}/vae",
            description="Decodes Mochi latents (the host's convention, so KSampler latents work "
                        "too) to exactly 6T−5 frames. Streams in time with the causal history "
                        "carried across chunks (no seams) and tiles in space with feathered "
                        "overlaps to bound memory.",
            inputs=[
                MochiDecoder.Input("decoder", tooltip="The decoder output of Mochi 1 VAE Loader."),
                io.Latent.Input("samples", tooltip="Video latents B × 12 × T × H/8 × W/8."),
                io.Int.Input("tile_size", default=0, min=0, max=MAX_SIZE, step=16,
                             tooltip="Spatial tile size in pixels (0 = whole frames). Smaller "
                                     "tiles use less memory."),
                io.Int.Input("tile_overlap", default=64, min=0, max=512, step=16,
                             tooltip="Overlap of neighbouring tiles in pixels, blended linearly."),
                io.Int.Input("frame_chunk", default=0, min=0, max=64,
                             tooltip="Latent frames decoded per chunk (0 = all at once); the "
                                     "result is the same, memory is lower. On a GPU it is "
                                     "lowered to what fits in memory and keeps every "
                                     "convolution under 2^31 elements (6 frames at 848×480)."),
            ],
            outputs=[io.Image.Output(tooltip="Frames × H × W × 3 in 0–1 (6T−5 frames).")],
        )

    @classmethod
    def validate_inputs(cls, tile_size=None, tile_overlap=None, frame_chunk=None) -> bool | str:
        return schema_error(cls, locals()) or first_error(
            None if not tile_size or (tile_size % 16 == 0 and tile_size >= 64) else
            f"tile_size must be 0 (whole frames) or a multiple of 16 from 64; got {tile_size}",
            None if not tile_size or tile_overlap is None or tile_overlap < tile_size else
            f"tile_overlap ({tile_overlap}) must be below tile_size ({tile_size})")

    @classmethod
    def execute(cls, decoder, samples, tile_size, tile_overlap, frame_chunk) -> io.NodeOutput:
        require(latent_error("samples", samples))  # a link: known only now
        require_half(decoder, "decoder")
        module = decoder.model.module
        dtype = next(module.parameters()).dtype
        latents = samples["samples"]
        job = memory.DecodeJob(module.config, tuple(latents.shape), dtype, frame_chunk or None,
                               tile_size // 8 or None, tile_overlap // 8)  # fmt: skip
        # Room for the smallest exact setting (one latent frame per chunk) at the chosen tiles:
        # the decoder picks the largest chunk that fits, or refuses with the tile sizes that do.
        smallest = memory.with_margin(dataclasses.replace(job, frames_per_chunk=1).need())
        mm.load_models_gpu([decoder], memory_required=smallest)
        z = latents.to(decoder.load_device, dtype=dtype)
        try:
            pixels = vae_tiling.decode(
                module, z, frames_per_chunk=frame_chunk or None,
                tile_size=tile_size // 8 or None, tile_overlap=tile_overlap // 8,
                callback=StepProgress(1))
            return io.NodeOutput(pixels_to_image(pixels))
        finally:
            del z
            return_freed_memory()  # also after a cancel: the tile buffers are gone by now


class VAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1VAEEncode",
            display_name="Mochi 1 VAE Encode",
            category=f"{CATEGORY}/vae",
            description="Encodes frames to Mochi latents (the host's convention) for "
                        "video-to-video: 6k+1 frames give k+1 latent frames.",
            inputs=[
                MochiEncoder.Input("encoder", tooltip="The encoder output of Mochi 1 VAE Loader "
                                                      "(a decoder is refused)."),
                io.Image.Input("images", tooltip="Frames × H × W × 3 in 0–1; width and height "
                                                 "multiples of 16."),
                io.Combo.Input("frame_handling", options=FRAME_HANDLING, default=FRAME_HANDLING[0],
                               tooltip="When the frame count is not 6k+1: drop the extra frames "
                                       "at the end, or stop with an error."),
            ],
            outputs=[io.Latent.Output(tooltip="Latents B × 12 × T × H/8 × W/8 (VAE space).")],
        )

    @classmethod
    def validate_inputs(cls, frame_handling=None) -> bool | str:
        return schema_error(cls, locals()) or first_error(
            choice_error("frame_handling", frame_handling, FRAME_HANDLING))

    @classmethod
    def execute(cls, encoder, images, frame_handling) -> io.NodeOutput:
        require(image_error("images", images))  # a link: known only now
        require_half(encoder, "encoder")
        images = check_frames(images, frame_handling)
        mm.load_models_gpu([encoder])
        pixels = image_to_pixels(images).to(encoder.load_device)
        latents = vae_tiling.encode(encoder.model.module, pixels, callback=StepProgress(1))
        return io.NodeOutput({"samples": latents.float().to(mm.intermediate_device())})


NODES = [VAEDecode, VAEEncode]
