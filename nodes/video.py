"""Save video node: IMAGE frames to an mp4/webm/gif/webp file in the output folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from fractions import Fraction

import folder_paths
import torch
from comfy.cli_args import args
from comfy_api.latest import InputImpl, Types, io

from mochi_core import text, video
from mochi_core.pipeline import MAX_FPS, MIN_FPS

from ._shared import CATEGORY, choice_error, first_error, image_error, require, schema_error

log = logging.getLogger(__name__)

#: Longest accepted prefix, in characters; keeps the whole path far below PATH_MAX (4096 bytes).
MAX_PREFIX = 200
FORMATS = {"mp4 (H.264)": "mp4", "webm (VP9)": "webm", "gif": "gif", "webp (animated)": "webp"}
#: What the host's counter and the longest extension add to the prefix's last name.
SUFFIX = "_00001_.webm"


def _prefix_text_error(prefix) -> str | None:
    """Text a file name can be: a string, at most MAX_PREFIX characters, valid Unicode, no NUL."""
    if not isinstance(prefix, str):
        return f"filename_prefix must be text; got {type(prefix).__name__}"
    if "\x00" in prefix or len(prefix) > MAX_PREFIX:
        nul = " with a NUL byte" if "\x00" in prefix else ""
        return (f"filename_prefix must be at most {MAX_PREFIX} characters without NUL bytes; "
                f"got {len(prefix)} characters{nul}")
    return text.unicode_problem("filename_prefix", prefix)


def _prefix_bytes_error(prefix: str, output: str) -> str | None:
    """Each name of the prefix within the filesystem's limit, which counts bytes (UTF-8), not
    characters; the last name also carries the host's counter and the extension."""
    limit = video.name_max(output)
    subfolder, name = os.path.split(os.path.normpath(prefix))
    for part in filter(None, subfolder.split(os.sep)):
        if video.name_bytes(part) > limit:
            return (f"filename_prefix: the folder name {part[:24]!r}... is "
                    f"{video.name_bytes(part)} bytes in UTF-8; the filesystem allows {limit} "
                    f"bytes per name")
    room = limit - len(SUFFIX)
    if video.name_bytes(name) > room:
        return (f"filename_prefix: the file name {name[:24]!r}... is {video.name_bytes(name)} "
                f"bytes in UTF-8; the filesystem allows {limit} bytes per name and the counter "
                f"and extension add {len(SUFFIX)} ('{SUFFIX}'), so at most {room} bytes (a "
                f"character such as 'é' takes 2 bytes, most CJK characters 3)")
    return None


def _prefix_folder_error(prefix: str, output: str) -> str | None:
    """Each existing folder of the prefix a real folder: not a link (the writer never follows
    one below the output folder), not a file."""
    walked = output
    for part in os.path.dirname(os.path.normpath(prefix)).split(os.sep):
        if part == os.pardir:
            return None  # leaves the output folder: refused by _prefix_place_error
        walked = os.path.join(walked, part)
        if part in ("", os.curdir) or not os.path.lexists(walked):
            continue
        shown = os.path.relpath(walked, output)
        if os.path.islink(walked):
            return (f"filename_prefix {prefix!r}: {shown!r} is a link (to "
                    f"{os.readlink(walked)}); videos are written only into real folders inside "
                    f"the output folder")
        if not os.path.isdir(walked):
            return f"filename_prefix {prefix!r}: {shown!r} in the output folder is not a folder"
    return None


def _prefix_place_error(prefix: str, output: str) -> str | None:
    """The prefix relative, through real folders, and (links resolved) inside the output
    folder."""
    if not prefix or os.path.isabs(prefix):
        return (f"filename_prefix must be a relative path inside the output folder (such as "
                f"'Mochi1/video'); got {prefix!r}")
    folder_error = _prefix_folder_error(prefix, output)
    if folder_error:
        return folder_error
    real_out = os.path.realpath(output)
    target = os.path.realpath(os.path.join(output, prefix))
    with contextlib.suppress(ValueError):  # no common path (another drive): outside
        if os.path.commonpath([real_out, target]) == real_out:
            return None
    return (f"filename_prefix must be a relative path inside the output folder (such as "
            f"'Mochi1/video'); {prefix!r} resolves to {target}")


def prefix_error(filename_prefix) -> str | None:
    """Why ``filename_prefix`` cannot name a file in the output folder, or None.

    Checked in this order, each check safe on what the earlier ones let through: text (type,
    length, NUL, valid Unicode), bytes per name (the filesystem's limit), place (inside the
    output folder, through real folders). Run at validation and again just before writing.
    """
    if filename_prefix is None:
        return None
    output = folder_paths.get_output_directory()
    return (_prefix_text_error(filename_prefix) or _prefix_bytes_error(filename_prefix, output)
            or _prefix_place_error(filename_prefix, output))


def workflow_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """The prompt and workflow as JSON strings, as the host's own savers embed them. Any size
    fits in every format; ``extra_pnginfo`` comes from the client, and if it is not an object it
    is logged and left out rather than failing the save."""
    if args.disable_metadata:
        return {}
    if extra_pnginfo is not None and not isinstance(extra_pnginfo, Mapping):
        log.warning("extra_pnginfo is a %s, not an object; not embedded",
                    type(extra_pnginfo).__name__)
        extra_pnginfo = None
    meta = {str(k): json.dumps(v) for k, v in (extra_pnginfo or {}).items()}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    return meta


def _save_path(prefix: str, output: str, images, ext: str) -> tuple[str, str, str]:
    """``(folder, file name, sub-folder)`` from the host's prefix rules and counter.

    The folder is made first by the confined writer's rules, so that the host's helper, which
    would create a missing folder through a link, finds it there (unless the folder part holds
    one of the host's ``%year%``-style fields, which only the helper expands).
    """
    subfolder = os.path.dirname(os.path.normpath(prefix))
    if "%" not in subfolder:
        video.make_folder(os.path.join(output, subfolder), output)
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, output, images.shape[2], images.shape[1])
    return folder, f"{name}_{counter:05}_.{ext}", subfolder


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
                io.Float.Input("fps", default=30.0, min=MIN_FPS, max=MAX_FPS, step=1.0,
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
    def validate_inputs(cls, fps=None, format=None, quality=None,
                        filename_prefix=None) -> bool | str:
        # the prefix rule first: its length message says more than the schema's text cap
        return first_error(prefix_error(filename_prefix), schema_error(cls, locals()),
                           choice_error("format", format, list(FORMATS)))

    @classmethod
    def execute(cls, images, fps, format, quality, filename_prefix) -> io.NodeOutput:
        require(image_error("images", images))
        require(prefix_error(filename_prefix))  # again: folders may have changed since validation
        ext, output = FORMATS[format], folder_paths.get_output_directory()
        frames = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        metadata = workflow_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo)
        try:
            folder, file, subfolder = _save_path(filename_prefix, output, images, ext)
            video.write_video(frames.numpy(), os.path.join(folder, file), fps=fps, fmt=ext,
                              quality=quality, metadata=metadata, root=output)
        except video.OutsideRootError as err:  # swapped after the check above: name the input
            raise video.OutsideRootError(f"filename_prefix {filename_prefix!r}: {err}") from None
        components = Types.VideoComponents(images=images, audio=None, frame_rate=Fraction(fps))
        result = {"filename": file, "subfolder": subfolder, "type": "output", "format": ext,
                  "fps": fps, "frames": int(images.shape[0])}
        return io.NodeOutput(images, InputImpl.VideoFromComponents(components),
                             ui={"mochi_video": [result]})


NODES = [SaveVideo]
