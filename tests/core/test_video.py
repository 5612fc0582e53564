"""Video writing: frame count, rate and size read back for every format, metadata, no overwrite."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mochi_core.video import FORMATS, read_video_info, write_video

META = {"prompt": "a cat", "workflow": {"nodes": [1, 2], "note": "a=b; c#d"}}


def clip(frames: int = 13, h: int = 32, w: int = 48) -> np.ndarray:
    """A smooth moving colour pattern (lossy codecs keep it close); every frame differs."""
    t, y, x, c = np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), np.arange(3),
                             indexing="ij")
    return (128 + 100 * np.sin(x / 6 + y / 9 + t / 2 + 2 * c)).astype(np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_frames_and_fps_read_back(tmp_path, fmt):
    path = write_video(clip(), tmp_path / f"out.{fmt}", fps=25, metadata=META)
    assert read_video_info(path) == (13, pytest.approx(25.0), 48, 32)
    assert not list(tmp_path.glob(".*partial*")), "temporary file left behind"


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_exact_rate_30fps_and_odd_size(tmp_path, fmt):
    path = write_video(torch.from_numpy(clip(7, 31, 45)), tmp_path / f"odd.{fmt}", fps=30)
    frames, fps, w, h = read_video_info(path)
    assert (frames, fps, w, h) == (7, 30.0, 46, 32)


def test_mp4_is_h264_yuv420p_with_metadata(tmp_path):
    path = write_video(clip(), tmp_path / "m.mp4", fps=30, metadata=META)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert c.metadata["prompt"] == "a cat"
        assert json.loads(c.metadata["workflow"]) == META["workflow"]
        assert len(list(c.decode(video=0))) == 13


def test_webm_is_vp9_with_metadata(tmp_path):
    path = write_video(clip(), tmp_path / "m.webm", fps=30, metadata=META)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "vp9"
        tags = {k.lower(): v for k, v in c.metadata.items()}
        assert json.loads(tags["workflow"]) == META["workflow"]


def test_gif_and_webp_metadata_and_pixels(tmp_path):
    frames = clip()
    gif = write_video(frames, tmp_path / "a.gif", fps=20, metadata=META)
    with Image.open(gif) as im:
        assert json.loads(im.info["comment"]) == META
    webp = write_video(frames, tmp_path / "a.webp", fps=20, quality=100, metadata=META)
    with Image.open(webp) as im:
        assert json.loads(im.getexif()[0x010E]) == META
        im.seek(5)
        got = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(got - frames[5]).mean() < 12  # lossy, but the right frame


def test_gif_rate_is_rounded_to_centiseconds(tmp_path):
    path = write_video(clip(4), tmp_path / "r.gif", fps=30)
    assert read_video_info(path)[1] == pytest.approx(100 / 3)


def test_never_overwrites(tmp_path):
    target = tmp_path / "x.mp4"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        write_video(clip(), target, fps=30)
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "frames, kwargs, match",
    [
        (clip().astype(np.float32), {}, "uint8"),
        (clip()[..., :2], {}, "F × H × W × 3"),
        (clip(), {"fmt": "avi"}, "format"),
        (clip(), {"fps": 0}, "fps"),
        (clip(), {"quality": 101}, "quality"),
    ],
)
def test_invalid_arguments(tmp_path, frames, kwargs, match):
    args = {"fps": 30, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_video(frames, tmp_path / "bad.mp4", **args)
    assert not (tmp_path / "bad.mp4").exists()
