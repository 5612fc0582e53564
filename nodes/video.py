"""Save video node: IMAGE frames to an mp4/webm/gif/webp file in the output folder."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import folder_paths
import torch
from comfy.cli_args import args
from comfy_api.latest import InputImpl, Types, io

from mochi_core import video

from ._shared import CATEGORY, choice_error, first_error, range_error

#: Longest accepted prefix (file names are limited to 255 bytes on most filesystems).
MAX_PREFIX = 200
FORMATS = {"mp4 (H.264)": "mp4", "webm (VP9)": "webm", "gif": "gif", "webp (animated)": "webp"}


def prefix_error(filename_prefix: str) -> str | None:
    """Refuse a prefix that would write outside the output folder."""
    if filename_prefix is None:
        return None
    if "\x00" in filename_prefix or len(filename_prefix) > MAX_PREFIX:
        nul = " with a NUL byte" if "\x00" in filename_prefix else ""
        return (f"filename_prefix must be at most {MAX_PREFIX} characters without NUL bytes; "
                f"got {len(filename_prefix)} characters{nul}")
    out = os.path.realpath(folder_paths.get_output_directory())
    target = os.path.realpath(os.path.join(out, filename_prefix or "x"))
    if filename_prefix and os.path.commonpath([out, target]) == out and not os.path.isabs(
        filename_prefix
    ):
        return None
    return (f"filename_prefix must be a relative path inside the output folder (such as "
            f"'Mochi1/video'); got {filename_prefix!r}")


def workflow_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """The prompt and workflow as JSON strings, as the host's own savers embed them."""
    if args.disable_metadata:
        return {}
    meta = {k: json.dumps(v) for k, v in (extra_pnginfo or {}).items()}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    return meta


class SaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1SaveVideo",
            display_name="Mochi 1 Save Video",
            category=f"{CATEGORY}/video",
            description="Writes frames as a video under the output folder (ComfyUI's prefix and "
                        "counter), embeds the workflow where the format allows, plays it in the "
                        "node, and passes the frames and a VIDEO on so the graph can continue.",
            inputs=[
                io.Image.Input("images", tooltip="Frames × H × W × 3 in 0–1, e.g. from Mochi 1 "
                                                 "VAE Decode."),
                io.Float.Input("fps", default=30.0, min=1.0, max=60.0, step=1.0,
                               tooltip="Frames per second (Mochi 1 was trained at 30)."),
                io.Combo.Input("format", options=list(FORMATS), default="mp4 (H.264)",
                               tooltip="Container and codec. mp4/webm/webp keep the workflow in "
                                       "the file's metadata; gif cannot."),
                io.Int.Input("quality", default=85, min=1, max=100,
                             tooltip="1 (smallest file) to 100 (best quality)."),
                io.String.Input("filename_prefix", default="Mochi1/video",
                                tooltip="Prefix of the file name inside the output folder; may "
                                        "contain sub-folders and %date:yyyy-MM-dd%-style fields."),
            ],
            outputs=[
                io.Image.Output(display_name="images",
                                tooltip="The same frames, to continue the graph."),
                io.Video.Output(display_name="video",
                                tooltip="The frames and frame rate as the host's VIDEO type."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, fps, format, quality, filename_prefix) -> bool | str:
        return first_error(range_error("fps", fps, 1.0, 60.0),
                           choice_error("format", format, list(FORMATS)),
                           range_error("quality", quality, 1, 100),
                           prefix_error(filename_prefix))

    @classmethod
    def execute(cls, images, fps, format, quality, filename_prefix) -> io.NodeOutput:
        ext = FORMATS[format]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), images.shape[2], images.shape[1])
        file = f"{name}_{counter:05}_.{ext}"
        frames = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        video.write_video(frames.numpy(), os.path.join(folder, file), fps=fps, fmt=ext,
                          quality=quality,
                          metadata=workflow_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo))
        components = Types.VideoComponents(images=images, audio=None, frame_rate=Fraction(fps))
        result = {"filename": file, "subfolder": subfolder, "type": "output", "format": ext,
                  "fps": fps, "frames": int(images.shape[0])}
        return io.NodeOutput(images, InputImpl.VideoFromComponents(components),
                             ui={"mochi_video": [result]})


NODES = [SaveVideo]
