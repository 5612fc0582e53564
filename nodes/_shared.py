"""Helpers shared by the node families: category, custom types, validation messages, progress.

Everything here is small and host-facing; the model itself lives in ``mochi_core``.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import comfy.latent_formats
import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

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


MAX_SIZE = 4096
MAX_FRAMES = 6 * 60 + 1


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


def file_error(name: str, folder: str, value: str, allow_none: bool = False) -> str | None:
    """A message when ``value`` is not a file of the host's model folder ``folder``, or is a
    link leaving it (:func:`outside_error`)."""
    if value is None or (allow_none and value == NONE):
        return None
    path = folder_paths.get_full_path(folder, value) if value else None
    if path is not None:
        return outside_error(name, folder, path)
    found = folder_paths.get_filename_list(folder)
    listing = ", ".join(found[:8]) if found else "the folder is empty"
    return (
        f"{name}: {value!r} was not found in the '{folder}' model folder "
        f"(found: {listing}); place the file under models/{folder}/"
    )


def model_path(folder: str, name: str) -> str:
    """The full path of a model file (validated before), or a clear error.

    The confinement check runs again here: the file may have been replaced by a link between
    validation and execution.
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
    lower = max(1, ((frames - 1) // 6) * 6 + 1) if isinstance(frames, int) else 7
    return (
        f"{name} must be 6k+1 between 7 and {MAX_FRAMES} (7, 13, 19, ..., 163, ...); "
        f"got {frames}, nearest valid: {max(7, lower)} or {max(7, lower) + 6}"
    )


def size_error(name: str, value: int) -> str | None:
    """The DiT needs width and height in multiples of 16 (2x2 patches of the 8x latent)."""
    if value is None:
        return None
    if isinstance(value, int) and 16 <= value <= MAX_SIZE and value % 16 == 0:
        return None
    nearest = min(MAX_SIZE, max(16, round(value / 16) * 16)) if isinstance(value, int) else 16
    return (f"{name} must be a multiple of 16 between 16 and {MAX_SIZE}; got {value}, "
            f"nearest valid: {nearest}")


def range_error(name: str, value, low, high) -> str | None:
    """A message naming ``name`` and its range when ``value`` falls outside [low, high]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number between {low} and {high}; got {value!r}"
    if low <= value <= high:
        return None
    return f"{name} must be between {low} and {high}; got {value}"


def first_error(*messages: str | None) -> bool | str:
    """What ``validate_inputs`` returns: True, or the first message."""
    for message in messages:
        if message:
            return message
    return True


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
