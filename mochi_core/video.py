"""Writing generated frames to video files: MP4 (H.264), WebM (VP9), GIF and animated WebP.

MP4 and WebM are encoded with PyAV (libx264 / libvpx-vp9, ``yuv420p``, so odd widths/heights are
padded by one replicated row/column); GIF and WebP with Pillow. Every encoder writes into a file
object this module opened, so no command line is built (metadata of any size fits) and no path
is handed to a library that could follow a link.

Metadata (e.g. ``{"prompt": ..., "workflow": <JSON>}``) is embedded in every format: MP4/WebM
container tags (text as is; other values, and text that is not valid Unicode or holds a NUL, as
JSON; the MP4 ``moov`` is reserved at the start, so the file streams as with ``faststart``), a GIF
comment (chained 255-byte blocks) and the EXIF ``ImageDescription`` of a WebP (a chunk with a
32-bit size), both holding the whole dict as JSON. None of them has a size limit that a workflow
reaches.

Frame timing: MP4/WebM store the exact rate; GIF stores delays in 1/100 s and WebP in 1/1000 s,
so a rate that does not divide those (e.g. 30 fps in a GIF) is rounded.

Where files go (``root``): the target's folder must lie inside ``root`` (by default the target's
own folder). Every folder below ``root`` is opened one at a time without following links (missing
ones are created), so a folder that was swapped for a link, even after any earlier check, is
refused (:class:`OutsideRootError`). The video is encoded into a new file with a random name
created exclusively in that folder (a planted file or link at that name is never opened), then
hard-linked to the target name, which fails if anything exists there: an existing file or link is
never overwritten or followed. The temporary file is removed on every path. Where the OS has no
directory descriptors (Windows), the folders are checked by their real paths instead, once before
encoding and again just before the file is placed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMATS = ("mp4", "webm", "gif", "webp")
DEFAULT_QUALITY = 85
#: Longest file or folder name, in bytes, where the filesystem does not say (ext4, NTFS, APFS).
NAME_MAX = 255
_EXIF_IMAGE_DESCRIPTION = 0x010E
_TEMP_TRIES = 16
#: Dir-fd confinement needs descriptor-relative open/mkdir/link/unlink and O_NOFOLLOW.
DIR_FDS = (hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY")
           and {os.open, os.mkdir, os.link, os.unlink, os.stat} <= os.supports_dir_fd)  # fmt: skip


class OutsideRootError(PermissionError):
    """The target folder is, or passes through, a link (or leads outside the folder it must stay
    in); nothing was written."""


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


def _is_clean_text(text: str) -> bool:
    """Text a C string can carry: valid Unicode (no lone surrogate) and no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Container tags: text as is, anything else (and text no C string can carry) as JSON.
    A key that is empty or not clean text cannot be a tag name; it is logged and skipped."""
    out = {}
    for key, value in (metadata or {}).items():
        key = str(key)
        if not key or not _is_clean_text(key):
            log.warning("metadata key %r cannot be stored as a tag; skipped", key)
            continue
        clean = isinstance(value, str) and _is_clean_text(value)
        out[key] = value if clean else json.dumps(value, default=str)
    return out


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes by replicating the last row/column (yuv420p needs them)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        log.info("padding %dx%d frames to even size for yuv420p", frames.shape[2], frames.shape[1])
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _codec_settings(fmt: str, quality: int) -> tuple[str, dict[str, str]]:
    """Encoder and its options; quality 0–100 maps to a CRF (higher quality, lower CRF)."""
    if fmt == "mp4":
        crf = round(10 + 0.4 * (100 - quality))  # 85 -> 16
        return "libx264", {"crf": str(crf), "preset": "medium", "threads": "auto"}
    crf = round(15 + 0.48 * (100 - quality))  # 85 -> 22
    return "libvpx-vp9", {"crf": str(crf), "b": "0", "deadline": "good", "cpu-used": "4",
                          "row-mt": "1", "threads": "auto"}  # fmt: skip


def _container_options(fmt: str, n_frames: int, tags: Mapping[str, str]) -> dict[str, str]:
    """MP4: keep custom tags, and reserve room for the ``moov`` index at the start of the file
    (the effect of ``faststart`` without re-opening the file by name). Its sample tables take at
    most 28 bytes per frame (size, offset, time, composition offset, key flag; measured: 6), each
    tag its text plus a 24-byte header; 32 per frame, 64 per tag and 8 KiB are reserved."""
    if fmt != "mp4":
        return {}
    tag_bytes = sum(len(k.encode()) + len(v.encode()) + 64 for k, v in tags.items())
    return {"movflags": "use_metadata_tags", "moov_size": str(8192 + 32 * n_frames + tag_bytes)}


def _encode_av(frames: np.ndarray, file: BinaryIO, fps: float, fmt: str, quality: int,
               metadata: Mapping[str, Any]) -> None:  # fmt: skip
    import av  # noqa: PLC0415

    frames = _pad_even(frames)
    tags = _metadata_strings(metadata)
    codec, options = _codec_settings(fmt, quality)
    with av.open(file, "w", format=fmt,
                 options=_container_options(fmt, len(frames), tags)) as container:  # fmt: skip
        for key, value in tags.items():
            container.metadata[key] = value
        # The rate as ffmpeg's own -r parses it (av_d2q with the same bound).
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001000),
                                      options=options)  # fmt: skip
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for index, frame in enumerate(frames):
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            image = image.reformat(format="yuv420p", interpolation="BICUBIC")  # as ffmpeg's scale
            image.pts = index
            container.mux(stream.encode(image))
        container.mux(stream.encode())


def _encode_pillow(frames: np.ndarray, file: BinaryIO, fps: float, fmt: str, quality: int,
                   metadata: Mapping[str, Any]) -> None:  # fmt: skip
    from PIL import Image  # noqa: PLC0415

    images = [Image.fromarray(frame) for frame in frames]
    text = json.dumps(dict(metadata), default=str) if metadata else None
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "loop": 0}
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
    images[0].save(file, format=fmt.upper(), **options)


def name_max(folder: str | Path) -> int:
    """Longest name, in bytes, the filesystem of ``folder`` (or its nearest existing parent)
    allows; :data:`NAME_MAX` where it does not say."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return NAME_MAX


def name_bytes(name: str) -> int:
    """Length of ``name`` as the filesystem stores it (UTF-8 bytes, not characters)."""
    return len(os.fsencode(name))


def _folder_parts(folder: Path, root: Path) -> list[str]:
    """The names leading from ``root`` to ``folder``, compared lexically (``..`` removed as text,
    never through a link); refused if ``folder`` is not below ``root``."""
    try:
        rel = os.path.relpath(os.path.abspath(folder), os.path.abspath(root))
    except ValueError:  # another drive (Windows): no relative path at all
        rel = os.path.abspath(folder)
    parts = [] if rel == os.curdir else rel.split(os.sep)
    if os.path.isabs(rel) or os.pardir in parts:
        raise OutsideRootError(f"{folder} is outside {root}; refusing to write there")
    return parts


def _link_error(path: Path, target: str) -> OutsideRootError:
    return OutsideRootError(f"{path} is a link (to {target}); videos are written only into real "
                            f"folders, never through a link; nothing was written")  # fmt: skip


def _open_below(parent: int, name: str, path: Path) -> int:
    """Open (creating it if missing) the folder ``name`` of ``parent`` without following a link."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    with contextlib.suppress(FileExistsError):  # made by someone else meanwhile: opened below
        if not _exists_at(parent, name):
            os.mkdir(name, dir_fd=parent)
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR) and _is_link_at(parent, name):
            raise _link_error(path, os.readlink(name, dir_fd=parent)) from None
        raise


def _exists_at(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _is_link_at(folder: int, name: str) -> bool:
    return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)


@contextlib.contextmanager
def _open_folder(folder: Path, root: Path) -> Iterator[int]:
    """A descriptor of ``folder``, reached from ``root`` one name at a time, links refused."""
    parts = _folder_parts(folder, root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        walked = Path(root)
        for name in parts:
            walked = walked / name
            child = _open_below(fd, name, walked)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _create_temp(open_new: Callable[[str, int], int]) -> tuple[str, int]:
    """A new file with a random name, created exclusively and never through a link:
    ``open_new(name, flags)`` opens ``name`` in the target folder. A name that is taken (by a
    planted file or link, say) is never touched; another is drawn."""
    flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))  # fmt: skip
    for _ in range(_TEMP_TRIES):
        name = f".mochi-{secrets.token_hex(12)}.partial"
        try:
            return name, open_new(name, flags)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name after {_TEMP_TRIES} tries")


def _place_at(folder: int, tmp: str, name: str, path: Path) -> None:
    """Give the finished file ``tmp`` the name ``name``, only if nothing exists there."""
    try:
        os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        return
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; not overwriting it") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    # No hard links on this filesystem: the best left is a check just before the rename.
    if _exists_at(folder, name):
        raise FileExistsError(f"{path} already exists; not overwriting it")
    os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)


def _encode_into(fd: int, frames: np.ndarray, encode) -> None:
    """Encode into the open temporary file ``fd`` (closed afterwards), flushed to the disk."""
    with os.fdopen(fd, "w+b") as file:
        encode(frames, file)
        file.flush()
        os.fsync(file.fileno())


def _write_with_dir_fds(frames: np.ndarray, path: Path, root: Path, encode) -> None:
    with _open_folder(path.parent, root) as folder:
        if _exists_at(folder, path.name):
            raise FileExistsError(f"{path} already exists; not overwriting it")
        tmp, fd = _create_temp(lambda name, flags: os.open(name, flags, 0o666, dir_fd=folder))
        try:
            _encode_into(fd, frames, encode)
            _place_at(folder, tmp, path.name, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)


def _check_real_folder(folder: Path, root: Path) -> None:
    """Portable check: no name below ``root`` on the way to ``folder`` is a link or junction,
    and the real path stays inside ``root``'s real path."""
    walked = Path(os.path.abspath(root))
    for name in _folder_parts(folder, root):
        walked = walked / name
        if walked.is_symlink() or getattr(os.path, "isjunction", lambda _: False)(walked):
            raise _link_error(walked, os.readlink(walked))
        walked.mkdir(exist_ok=True)
    real, real_root = os.path.realpath(walked), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise OutsideRootError(f"{folder} resolves to {real}, outside {real_root}; "
                               f"nothing was written")  # fmt: skip


def _write_portable(frames: np.ndarray, path: Path, root: Path, encode) -> None:
    _check_real_folder(path.parent, root)
    if os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; not overwriting it")
    name, fd = _create_temp(lambda name, flags: os.open(path.parent / name, flags, 0o666))
    tmp = path.parent / name
    try:
        _encode_into(fd, frames, encode)
        _check_real_folder(path.parent, root)  # again: the folder may have been swapped
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; not overwriting it") from None
        except OSError:  # no hard links here; Windows' rename refuses an existing target
            if os.path.lexists(path):
                raise FileExistsError(f"{path} already exists; not overwriting it") from None
            os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_folder(folder: str | Path, root: str | Path) -> None:
    """Create ``folder`` (and the folders leading to it) below ``root`` as :func:`write_video`
    would: never through a link (:class:`OutsideRootError`), never outside ``root``."""
    if DIR_FDS:
        with _open_folder(Path(folder), Path(root)):
            return
    _check_real_folder(Path(folder), Path(root))


def _check_arguments(path: Path, fmt: str, fps: float, quality: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"video format must be one of {FORMATS}, got {fmt!r}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be in 0..100, got {quality!r}")
    limit = name_max(path.parent)
    if name_bytes(path.name) > limit:
        raise ValueError(f"file name {path.name[:40]!r}... is {name_bytes(path.name)} bytes; the "
                         f"filesystem allows {limit} bytes per name")  # fmt: skip


def write_video(
    frames: np.ndarray | torch.Tensor,
    path: str | Path,
    fps: float,
    fmt: str | None = None,
    quality: int = DEFAULT_QUALITY,
    metadata: Mapping[str, Any] | None = None,
    root: str | Path | None = None,
) -> Path:
    """Write ``F × H × W × 3`` uint8 frames to ``path``, confined to ``root``.

    Args:
        frames: uint8 RGB frames (numpy array or tensor).
        path: target file; it must not exist.
        fps: frames per second (> 0).
        fmt: ``"mp4"``, ``"webm"``, ``"gif"`` or ``"webp"``; default from the file suffix.
        quality: 0–100; MP4/WebM map it to a CRF, WebP uses it directly, GIF ignores it.
        metadata: tags to embed (see the module docstring).
        root: folder the file must stay in (links in it or above it are trusted; below it no
            link is followed and missing folders are created); default ``path``'s own folder.

    Returns:
        the path written.

    Raises:
        FileExistsError: if ``path`` exists. OutsideRootError: if the folder is not below
        ``root`` or passes through a link. ValueError: on bad frames, format, fps, quality or a
        file name longer than the filesystem allows.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    _check_arguments(path, fmt, fps, quality)
    frames = _as_frames(frames)
    encoder = _encode_av if fmt in ("mp4", "webm") else _encode_pillow

    def encode(frames: np.ndarray, file: BinaryIO) -> None:
        encoder(frames, file, fps, fmt, quality, metadata or {})

    write = _write_with_dir_fds if DIR_FDS else _write_portable
    write(frames, path, Path(root) if root is not None else path.parent, encode)
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
    import av  # noqa: PLC0415

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or 0
        return frames, float(rate), stream.codec_context.width, stream.codec_context.height
