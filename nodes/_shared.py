"""Helpers shared by the node families: category, custom types, validation messages, progress.

Everything here is small and host-facing; the model itself lives in ``mochi_core``.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import comfy.latent_formats
import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io

from mochi_core import checkpoints, pipeline, text

CATEGORY = "Mochi 1"

# Custom types, only for objects the host has no type of its own for.
MochiModel = io.Custom("MOCHI_MODEL")
MochiTextEncoder = io.Custom("MOCHI_TEXT_ENCODER")
MochiDecoder = io.Custom("MOCHI_VAE_DECODER")
MochiEncoder = io.Custom("MOCHI_VAE_ENCODER")
MochiTiling = io.Custom("MOCHI_DIT_TILING")

NONE = "none"


@dataclass(frozen=True)
class ManagedText:
    """A T5 conditioner with its encoder under the host's model management."""

    conditioner: object
    patcher: object


# The size and frame limits of the pack, from the core (the CLI shares them).
MAX_SIZE, MAX_FRAMES = pipeline.MAX_SIZE, pipeline.MAX_FRAMES
MAX_LATENT_FRAMES = (MAX_FRAMES - 1) // 6 + 1
#: Longest value of a text input unless its node says otherwise (``MAX_CHARS``).
MAX_TEXT = text.MAX_PROMPT_CHARS
LATENT_LAYOUT = "B × 12 × T × H/8 × W/8"


def choice_error(name: str, value, options) -> str | None:
    """A message naming ``name`` and the allowed values when ``value`` is not one of them.

    Like every check here, a ``None`` value (an input linked from another node, whose value is
    not known at validation time) passes.
    """
    if value is None or value in options:
        return None
    shown = ", ".join(map(str, options[:12])) + (", ..." if len(options) > 12 else "")
    return f"{name}: {value!r} is not one of the allowed values ({shown})"


def outside_error(name: str, folder: str, path: str) -> str | None:
    """A message when ``path`` (found in model folder ``folder``) resolves outside every folder
    the host has for ``folder``: a symlink that leaves the models tree.

    Links inside the tree, and folders that are themselves links (``models/vae -> /data/vae``),
    are fine: the file's real path is compared with the real paths of the registered folders.
    A folder outside ``models/`` becomes allowed by registering it in the host's
    ``extra_model_paths.yaml``.
    """
    real = os.path.realpath(path)
    roots = [os.path.realpath(root) for root in folder_paths.get_folder_paths(folder)]
    if any(os.path.commonpath([root, real]) == root for root in roots):
        return None
    return (f"{name}: {os.path.basename(path)!r} is a link to {real}, outside the "
            f"'{folder}' model folders; refusing to read it. Move the file into "
            f"models/{folder}/ or register its folder in extra_model_paths.yaml")


def confined(name: str, folder: str) -> Callable[[Path], None]:
    """The ``check_file`` of ``mochi_core``'s loaders: every file they resolve (the chosen one,
    the shards and the shard index beside it) must lie in the model folders of ``folder``."""
    def check(path: Path) -> None:
        message = outside_error(name, folder, str(path))
        if message:
            raise PermissionError(message)
    return check


def files_error(name: str, folder: str, path: str) -> str | None:
    """:func:`outside_error` for every file a loader would read for ``path``."""
    try:
        checkpoints.resolve_files(path, check_file=confined(name, folder))
    except PermissionError as err:
        return str(err)
    except checkpoints.CheckpointError as err:
        return f"{name}: {err}"
    return None


def file_error(name: str, folder: str, value: str, allow_none: bool = False) -> str | None:
    """A message when ``value`` is not a file of the host's model folder ``folder``, or it or
    a file read with it (diffusers shards) is a link leaving it (:func:`outside_error`)."""
    if value is None or (allow_none and value == NONE):
        return None
    path = folder_paths.get_full_path(folder, value) if isinstance(value, str) and value else None
    if path is not None:
        return files_error(name, folder, path)
    found = folder_paths.get_filename_list(folder)
    listing = ", ".join(found[:8]) if found else "the folder is empty"
    return (
        f"{name}: {shown(value)} was not found in the '{folder}' model folder "
        f"(found: {listing}); place the file under models/{folder}/"
    )


def model_path(folder: str, name: str) -> str:
    """The full path of a model file (validated before), or a clear error.

    The confinement check runs again here: the file may have been replaced by a link between
    validation and execution (the loaders also check each shard they read, see :func:`confined`).
    """
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{name!r} is not in the '{folder}' model folder")
    message = outside_error(f"{folder} file", folder, path)
    if message:
        raise PermissionError(message)
    return path


def frames_error(name: str, frames: int) -> str | None:
    """Mochi's causal VAE needs 6k+1 pixel frames."""
    if frames is None:
        return None
    if isinstance(frames, int) and 7 <= frames <= MAX_FRAMES and (frames - 1) % 6 == 0:
        return None
    if isinstance(frames, bool) or not isinstance(frames, int):
        return (f"{name} must be a whole number 6k+1 between 7 and {MAX_FRAMES}; "
                f"got {shown(frames)}")
    lower = min(MAX_FRAMES, max(7, (frames - 1) // 6 * 6 + 1))
    upper = f" or {lower + 6}" if lower < frames and lower + 6 <= MAX_FRAMES else ""
    return (f"{name} must be 6k+1 between 7 and {MAX_FRAMES} (7, 13, 19, ..., 163, ...); "
            f"got {shown(frames)}, nearest valid: {lower}{upper}")


def size_error(name: str, value: int) -> str | None:
    """The DiT needs width and height in multiples of 16 (2x2 patches of the 8x latent)."""
    if value is None:
        return None
    if isinstance(value, int) and 16 <= value <= MAX_SIZE and value % 16 == 0:
        return None
    nearest = min(MAX_SIZE, max(16, (value + 8) // 16 * 16)) if isinstance(value, int) else 16
    return (f"{name} must be a multiple of 16 between 16 and {MAX_SIZE}; got {shown(value)}, "
            f"nearest valid: {nearest}")


def shown(value) -> str:
    """``value`` for a message: text quoted and cut, huge integers by their length."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        digits = int(value.bit_length() * math.log10(2)) + 1  # no 4,000-digit str()
        return f"{'-' if value < 0 else ''}a number of about {digits:,} digits"
    if isinstance(value, str):
        return repr(value[:120] + "...") if len(value) > 120 else repr(value)
    return str(value)


def range_error(name: str, value, low, high, integer: bool = False) -> str | None:
    """A message naming ``name`` and its range when ``value`` is not a (whole, if ``integer``)
    finite number in [low, high]. Integers are compared exactly, however large."""
    if value is None:
        return None
    types = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, types):
        kind = "a whole number" if integer else "a number"
        return f"{name} must be {kind} between {low} and {high}; got {shown(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number between {low} and {high}; got {value}"
    if low <= value <= high:
        return None
    return f"{name} must be between {low} and {high}; got {shown(value)}"


def text_error(name: str, value, limit: int) -> str | None:
    """A message when ``value`` is not text of at most ``limit`` characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        return f"{name} must be text; got {type(value).__name__}"
    if len(value) <= limit:
        return None
    return f"{name} is {len(value):,} characters long; at most {limit:,} are accepted"


@functools.cache
def _widgets(node: type[io.ComfyNode]) -> tuple:
    """The number and text inputs of ``node``'s schema (their limits never change)."""
    kinds = (io.Int.Input, io.Float.Input, io.String.Input)
    return tuple(i for i in node.define_schema().inputs if isinstance(i, kinds))


def _widget_error(node: type[io.ComfyNode], spec, value) -> str | None:
    """One input's value against what the schema declares for it."""
    if isinstance(spec, io.String.Input):
        return text_error(spec.id, value, getattr(node, "MAX_CHARS", {}).get(spec.id, MAX_TEXT))
    low = -math.inf if spec.min is None else spec.min
    high = math.inf if spec.max is None else spec.max
    return range_error(spec.id, value, low, high, integer=isinstance(spec, io.Int.Input))


def schema_error(node: type[io.ComfyNode], values: Mapping[str, object]) -> str | None:
    """The first number outside its input's declared ``min``/``max`` (or not finite) and the
    first text longer than its cap, among ``values`` (what ``validate_inputs`` was given).

    The host skips its own min/max check for every input a node's ``validate_inputs`` takes,
    and never checks NaN, so each node starts its validation here; the limits are read from
    the node's own schema, so the check and the widgets cannot drift apart. Other checks can
    then rely on in-range, finite numbers.
    """
    for spec in _widgets(node):
        message = _widget_error(node, spec, values.get(spec.id))
        if message:
            return message
    return None


def first_message(*messages: str | None) -> str | None:
    """The first message that is not empty, or None."""
    return next((message for message in messages if message), None)


def first_error(*messages: str | None) -> bool | str:
    """What ``validate_inputs`` returns: True, or the first message."""
    return first_message(*messages) or True


def _latent_shape_error(name: str, samples: torch.Tensor) -> str | None:
    """Rank and channels of a LATENT's samples, with a hint at where it came from."""
    got = "×".join(map(str, samples.shape))
    if samples.dim() == 4:
        source = (" from EmptyLatentImage" if samples.shape[1] == 4 else "")
        return (f"{name}: this looks like an image latent ({samples.shape[1]} channels){source}; "
                f"use EmptyMochiLatentVideo or Mochi 1 VAE Encode (a Mochi video latent is "
                f"{LATENT_LAYOUT}, got {got})")
    if samples.dim() != 5:
        return f"{name}: expected a Mochi video latent {LATENT_LAYOUT}; got shape {got}"
    if samples.shape[1] != 12:
        return (f"{name}: the latent has {samples.shape[1]} channels, a Mochi video latent 12 "
                f"({LATENT_LAYOUT}, got {got}); it comes from another model's VAE or empty "
                f"latent: use EmptyMochiLatentVideo or Mochi 1 VAE Encode")
    return None


def _latent_size_error(name: str, samples: torch.Tensor, even: bool) -> str | None:
    """Batch, frames and sides of a 5-D, 12-channel latent."""
    b, _, t, h, w = samples.shape
    got = "×".join(map(str, samples.shape))
    if b < 1 or not 1 <= t <= MAX_LATENT_FRAMES:
        what = f"{b} videos" if b < 1 else f"{t} latent frames"
        return (f"{name}: the latent has {what}; it needs at least 1 (and at most "
                f"{MAX_LATENT_FRAMES} latent frames, {MAX_FRAMES} video frames), got {got}")
    side = MAX_SIZE // 8
    if not (1 <= h <= side and 1 <= w <= side) or (even and (h % 2 or w % 2)):
        rule = "even, " if even else ""
        return (f"{name}: the latent is {w}×{h} ({w * 8}×{h * 8} pixels); its sides must be "
                f"{rule}1 to {side} (the sampler needs pixel sides in multiples of 16, up to "
                f"{MAX_SIZE}), got {got}")
    return None


def latent_error(name: str, latent, even: bool = False) -> str | None:
    """A message when ``latent`` (a LATENT input, known only when the node runs) is not a
    Mochi video latent ``B × 12 × T × H/8 × W/8`` with T >= 1 and sides in range (``even``: in
    multiples of 2, as the DiT's 2×2 patches need)."""
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
        got = (f"'samples' of type {type(samples).__name__}" if isinstance(latent, Mapping)
               else type(latent).__name__)
        return (f"{name}: expected a LATENT holding a floating-point 'samples' tensor "
                f"{LATENT_LAYOUT}; got {got}")
    return _latent_shape_error(name, samples) or _latent_size_error(name, samples, even)


def image_error(name: str, images) -> str | None:
    """A message when ``images`` (an IMAGE input) is not ``frames × H × W × 3`` (or 4) with
    1 to ``MAX_FRAMES`` frames and sides up to ``MAX_SIZE``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = "×".join(map(str, images.shape)) if isinstance(images, torch.Tensor) else \
            type(images).__name__
        return f"{name}: expected IMAGE frames × H × W × 3; got {got}"
    f, h, w, c = images.shape
    if c not in (3, 4) or not 1 <= f <= MAX_FRAMES or not (1 <= h <= MAX_SIZE and
                                                            1 <= w <= MAX_SIZE):
        return (f"{name}: expected IMAGE frames × H × W × 3 with 1 to {MAX_FRAMES} frames and "
                f"sides up to {MAX_SIZE}; got {f}×{h}×{w}×{c}")
    return None


def require(message: str | None) -> None:
    """Raise the message of a failed run-time check (a linked input) as a ValueError."""
    if message:
        raise ValueError(message)


class StepProgress:
    """A host progress bar that also checks for a cancel and sends latent previews.

    Called by ``mochi_core`` once per step/tile as ``(step, total, preview_latent_or_None)``.
    """

    def __init__(self, total: int, preview_device=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.previewer = None
        if preview_device is not None:
            mochi = comfy.latent_formats.Mochi()
            self.previewer = latent_preview.get_previewer(preview_device, mochi)

    def __call__(self, step: int, total: int, preview=None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        image = None
        if self.previewer is not None and preview is not None:
            image = self.previewer.decode_latent_to_preview_image("JPEG", preview)
        self.bar.update_absolute(step, total, image)


def check_interrupted() -> None:
    """Raise the host's interrupt exception when the user cancelled the prompt."""
    comfy.model_management.throw_exception_if_processing_interrupted()


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc (macOS, Windows, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the pages of freed tensors back to the OS after a large CPU job.

    glibc keeps freed heap memory for reuse (tile buffers fall below its adaptive mmap
    threshold), so without this the server's resident memory stays up to ~150 MB above its
    level after a decode, cancelled or not, although nothing is referenced any more. Costs a
    few milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
