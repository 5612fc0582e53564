"""Writing generated frames to video files: MP4 (H.264), WebM (VP9), GIF and animated WebP.

MP4 and WebM go through the ffmpeg binary bundled with ``imageio-ffmpeg`` (``yuv420p``, so odd
widths/heights are padded by one replicated row/column); GIF and WebP through Pillow.

Metadata (e.g. ``{"prompt": ..., "workflow": <JSON>}``) is embedded where the format allows:
MP4/WebM container tags (values that are not strings are stored as JSON), a GIF comment and the
EXIF ``ImageDescription`` of a WebP, both holding the whole dict as JSON.

Frame timing: MP4/WebM store the exact rate; GIF stores delays in 1/100 s and WebP in 1/1000 s,
so a rate that does not divide those (e.g. 30 fps in a GIF) is rounded.

An existing file is never overwritten: the video is written to a temporary file beside the
target and linked into place only if the target still does not exist.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMATS = ("mp4", "webm", "gif", "webp")
DEFAULT_QUALITY = 85
_EXIF_IMAGE_DESCRIPTION = 0x010E


def _as_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate ``F × H × W × 3`` uint8 frames and return them as a numpy array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be F × H × W × 3, got {frames.shape}")
    return frames


def _metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out = {}
    for key, value in (metadata or {}).items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return out


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes by replicating the last row/column (yuv420p needs them)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        log.info("padding %dx%d frames to even size for yuv420p", frames.shape[2], frames.shape[1])
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _ffmpeg_params(
    fmt: str, quality: int, metadata: Mapping[str, Any]
) -> tuple[str, list[str]]:
    """Codec and output arguments; quality 0–100 maps to a CRF (higher quality, lower CRF)."""
    if fmt == "mp4":
        crf = round(10 + 0.4 * (100 - quality))  # 85 -> 16
        codec = "libx264"
        params = ["-crf", str(crf), "-preset", "medium",
                  "-movflags", "+faststart+use_metadata_tags"]  # fmt: skip
    else:
        crf = round(15 + 0.48 * (100 - quality))  # 85 -> 22
        codec = "libvpx-vp9"
        params = ["-crf", str(crf), "-b:v", "0", "-deadline", "good", "-cpu-used", "4",
                  "-row-mt", "1"]  # fmt: skip
    for key, value in _metadata_strings(metadata).items():
        params += ["-metadata", f"{key}={value}"]
    return codec, params


def _write_ffmpeg(frames: np.ndarray, path: Path, fps: float, fmt: str, quality: int,
                  metadata: Mapping[str, Any]) -> None:  # fmt: skip
    import imageio_ffmpeg  # noqa: PLC0415

    frames = _pad_even(frames)
    codec, params = _ffmpeg_params(fmt, quality, metadata)
    writer = imageio_ffmpeg.write_frames(
        str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec=codec, quality=None,
        pix_fmt_out="yuv420p", macro_block_size=1, output_params=["-f", fmt, *params],
    )  # fmt: skip
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_pillow(frames: np.ndarray, path: Path, fps: float, fmt: str, quality: int,
                  metadata: Mapping[str, Any]) -> None:  # fmt: skip
    from PIL import Image  # noqa: PLC0415

    images = [Image.fromarray(frame) for frame in frames]
    text = json.dumps(dict(metadata)) if metadata else None
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "loop": 0,
                               "duration": 1000.0 / fps}  # fmt: skip
    if fmt == "gif":
        options["duration"] = 10 * round(100.0 / fps)  # GIF delays are centiseconds
        if text:
            options["comment"] = text
    else:
        options |= {"duration": round(1000.0 / fps), "quality": quality, "method": 4}
        if text:
            exif = Image.Exif()
            exif[_EXIF_IMAGE_DESCRIPTION] = text
            options["exif"] = exif
    images[0].save(path, format=fmt.upper(), **options)


def _place(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (atomic where hard links work)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; not overwriting it") from None
    except OSError:  # no hard links on this filesystem
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting it") from None
        os.replace(tmp, path)


def write_video(
    frames: np.ndarray | torch.Tensor,
    path: str | Path,
    fps: float,
    fmt: str | None = None,
    quality: int = DEFAULT_QUALITY,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``F × H × W × 3`` uint8 frames to ``path``.

    Args:
        frames: uint8 RGB frames (numpy array or tensor).
        path: target file; it must not exist.
        fps: frames per second (> 0).
        fmt: ``"mp4"``, ``"webm"``, ``"gif"`` or ``"webp"``; default from the file suffix.
        quality: 0–100; MP4/WebM map it to a CRF, WebP uses it directly, GIF ignores it.
        metadata: tags to embed (see the module docstring).

    Returns:
        the path written.

    Raises:
        FileExistsError: if ``path`` exists. ValueError: on bad frames, format, fps or quality.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"video format must be one of {FORMATS}, got {fmt!r}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be in 0..100, got {quality!r}")
    frames = _as_frames(frames)
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwriting it")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.{fmt}")
    writer = _write_ffmpeg if fmt in ("mp4", "webm") else _write_pillow
    try:
        writer(frames, tmp, fps, fmt, quality, metadata or {})
        _place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %d frames (%dx%d, %g fps) to %s", len(frames), frames.shape[2],
             frames.shape[1], fps, path)  # fmt: skip
    return path


def read_video_info(path: str | Path) -> tuple[int, float, int, int]:
    """``(frames, fps, width, height)`` of a video written by :func:`write_video`."""
    path = Path(path)
    if path.suffix.lower() in (".gif", ".webp"):
        from PIL import Image  # noqa: PLC0415

        with Image.open(path) as im:
            frames, (w, h) = im.n_frames, im.size
            durations = []
            for i in range(frames):
                im.seek(i)
                im.load()  # WebP fills in the frame duration on load
                durations.append(im.info.get("duration", 0))
        mean = sum(durations) / len(durations)
        return frames, (1000.0 / mean if mean else 0.0), w, h
    import imageio_ffmpeg  # noqa: PLC0415

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    w, h = meta["size"]
    return frames, float(meta["fps"]), w, h
