"""Video writing: frame count, rate and size read back for every format, metadata of any size,
no overwrite, and confinement: no link below the root is followed, at any moment of the write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mochi_core import video
from mochi_core.video import FORMATS, OutsideRootError, read_video_info, write_video

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


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of the writer anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if ".partial" in p.name]


@pytest.fixture(params=["dir_fds", "portable"])
def writer(request, monkeypatch):
    """Run a test with descriptor-relative confinement and with the portable (Windows) path."""
    if request.param == "dir_fds" and not video.DIR_FDS:
        pytest.skip("no directory descriptors on this OS")
    monkeypatch.setattr(video, "DIR_FDS", request.param == "dir_fds")
    return request.param


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the writer's root, holding a file that must never change."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim.txt").write_text("keep me")
    return folder


def untouched(outside: Path) -> bool:
    return [p.name for p in outside.iterdir()] == ["victim.txt"] and (
        (outside / "victim.txt").read_text() == "keep me")


@pytest.mark.parametrize("fmt", FORMATS)
def test_300_kib_of_metadata_round_trips(tmp_path, fmt):
    """More than one command-line argument may hold (128 KiB on Linux), in every format."""
    workflow = {"nodes": [{"id": i, "text": "é" * 150} for i in range(1000)]}
    assert len(json.dumps(workflow)) > 300 * 1024
    meta = {"prompt": json.dumps({"3": {"inputs": {"seed": 7}}}), "workflow": json.dumps(workflow)}
    path = write_video(clip(7), tmp_path / f"big.{fmt}", fps=30, metadata=meta)
    if fmt in ("mp4", "webm"):
        with av.open(str(path)) as c:
            tags = {k.lower(): v for k, v in c.metadata.items()}
    else:
        with Image.open(path) as im:
            raw = im.info["comment"] if fmt == "gif" else im.getexif()[0x010E]
            tags = json.loads(raw)
    assert json.loads(tags["workflow"]) == workflow and tags["prompt"] == meta["prompt"]
    assert read_video_info(path)[0] == 7 and not leftovers(tmp_path)


def test_mp4_index_is_at_the_start(tmp_path):
    """The moov atom precedes the media data (the file streams), with 300 KiB of tags too."""
    for name, meta in (("small.mp4", META), ("large.mp4", {"workflow": "w" * 300_000})):
        data = write_video(clip(), tmp_path / name, fps=30, metadata=meta).read_bytes()
        assert data.index(b"moov") < data.index(b"mdat"), name


def test_tags_no_c_string_can_carry_are_stored_as_json(tmp_path):
    meta = {"surrogate": "a\ud800b", "nul": "a\x00b", "": "empty key", "k\x00": "nul key"}
    path = write_video(clip(4), tmp_path / "odd.mp4", fps=30, metadata=meta)
    with av.open(str(path)) as c:
        tags = dict(c.metadata)
    assert json.loads(tags["surrogate"]) == "a\ud800b" and json.loads(tags["nul"]) == "a\x00b"
    assert "" not in tags and not any(k.startswith("k") for k in tags)


def test_planted_links_at_temporary_names_are_never_followed(tmp_path, outside, writer,
                                                             monkeypatch):
    """A link at the name the writer draws first (and at the former ``.<stem>.<pid>.partial``
    name) is skipped: the next random name is used, the link's target never changes."""
    draws = iter(["planted", "fresh"])
    monkeypatch.setattr(video.secrets, "token_hex", lambda _: next(draws))
    root = tmp_path / "out"
    root.mkdir()
    (root / ".mochi-planted.partial").symlink_to(outside / "victim.txt")
    (root / f".x.{os.getpid()}.partial.mp4").symlink_to(outside / "victim.txt")
    (root / ".dangling.partial").symlink_to(outside / "new.txt")
    path = write_video(clip(), root / "x.mp4", fps=30, root=root)
    assert read_video_info(path)[0] == 13 and not path.is_symlink()
    assert untouched(outside) and (outside / "victim.txt").stat().st_nlink == 1
    assert sorted(p.name for p in root.iterdir() if not p.is_symlink()) == ["x.mp4"]


@pytest.mark.parametrize("kind", ["file", "link", "dangling_link", "folder"])
def test_an_existing_target_is_never_overwritten_or_followed(tmp_path, outside, writer, kind):
    root = tmp_path / "out"
    root.mkdir()
    target = root / "x.mp4"
    if kind == "file":
        target.write_bytes(b"keep me")
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(outside / ("victim.txt" if kind == "link" else "new.mp4"))
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_video(clip(), target, fps=30, root=root)
    assert untouched(outside) and not leftovers(tmp_path)
    assert kind != "file" or target.read_bytes() == b"keep me"


def test_a_target_appearing_during_encoding_is_not_overwritten(tmp_path, writer, monkeypatch):
    """The name is taken only if still free once the file is complete (a hard link, which
    fails on any existing name)."""
    root, encode = tmp_path / "out", video._encode_av

    def encode_then_race(frames, file, *args):
        encode(frames, file, *args)
        (root / "x.mp4").symlink_to(tmp_path / "elsewhere.mp4")

    monkeypatch.setattr(video, "_encode_av", encode_then_race)
    root.mkdir()
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_video(clip(), root / "x.mp4", fps=30, root=root)
    assert not (tmp_path / "elsewhere.mp4").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("rest", ["x.mp4", "deeper/x.mp4"])
def test_a_folder_swapped_for_a_link_before_the_write_is_refused(tmp_path, outside, writer,
                                                                 rest):
    """``out/sub`` was a real folder when the prefix was checked; at write time it is a link to
    a folder outside: refused, nothing written or created outside."""
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    assert os.path.realpath(root / "sub").startswith(os.path.realpath(root))  # "validation"
    (root / "sub").rename(root / "sub.moved")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideRootError, match="is a link"):
        write_video(clip(), root / "sub" / rest, fps=30, root=root)
    assert untouched(outside) and not leftovers(tmp_path)


def test_a_folder_swapped_during_encoding_cannot_redirect_the_file(tmp_path, outside,
                                                                   monkeypatch):
    """With directory descriptors the folder is held open from before encoding: a swap while
    encoding leaves the file in the real folder (now renamed, still inside the root)."""
    if not video.DIR_FDS:
        pytest.skip("no directory descriptors on this OS")
    root, encode = tmp_path / "out", video._encode_av

    def encode_and_swap(frames, file, *args):
        (root / "sub").rename(root / "sub.moved")
        (root / "sub").symlink_to(outside, target_is_directory=True)
        encode(frames, file, *args)

    monkeypatch.setattr(video, "_encode_av", encode_and_swap)
    (root / "sub").mkdir(parents=True)
    write_video(clip(), root / "sub" / "x.mp4", fps=30, root=root)
    assert untouched(outside) and not leftovers(tmp_path)
    assert read_video_info(root / "sub.moved" / "x.mp4")[0] == 13


@pytest.mark.parametrize("where", ["sibling", "dotdot", "absolute"])
def test_a_target_outside_the_root_is_refused(tmp_path, writer, where):
    root = tmp_path / "out"
    root.mkdir()
    path = {"sibling": tmp_path / "other" / "x.mp4", "dotdot": root / ".." / "x.mp4",
            "absolute": Path("/x.mp4")}[where]
    with pytest.raises(OutsideRootError, match="outside"):
        write_video(clip(), path, fps=30, root=root)
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "other").exists()


def test_missing_folders_below_the_root_are_created(tmp_path, writer):
    root = tmp_path / "out"
    root.mkdir()
    path = write_video(clip(), root / "a" / "b" / "x.webm", fps=30, root=root)
    assert read_video_info(path)[0] == 13 and not leftovers(tmp_path)


def test_a_root_that_is_itself_a_link_is_trusted(tmp_path, writer):
    """The root (the host's output folder, or the CLI's output folder) may be a link."""
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real", target_is_directory=True)
    write_video(clip(), tmp_path / "out" / "x.gif", fps=30, root=tmp_path / "out")
    assert (tmp_path / "real" / "x.gif").is_file()


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_the_temporary_file_is_removed_when_encoding_fails(tmp_path, writer, monkeypatch, fmt):
    def fail(frames, file, *args):
        file.write(b"half a video")
        raise RuntimeError("encoder broke")

    monkeypatch.setattr(video, "_encode_av" if fmt == "mp4" else "_encode_pillow", fail)
    with pytest.raises(RuntimeError, match="encoder broke"):
        write_video(clip(), tmp_path / f"x.{fmt}", fps=30)
    assert list(tmp_path.iterdir()) == []


def test_a_name_longer_than_the_filesystem_allows_is_refused_before_encoding(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(video, "_encode_av", lambda *a: pytest.fail("encoded"))
    with pytest.raises(ValueError, match="256 bytes; the filesystem allows 255"):
        write_video(clip(), tmp_path / ("é" * 126 + ".mp4"), fps=30)
    assert list(tmp_path.iterdir()) == []


def test_make_folder_follows_the_writers_rules(tmp_path, outside, writer):
    """The node makes the folder first, so the host's helper never creates one through a link."""
    root = tmp_path / "out"
    root.mkdir()
    video.make_folder(root / "a" / "b", root)
    assert (root / "a" / "b").is_dir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideRootError, match="is a link"):
        video.make_folder(root / "link" / "c", root)
    with pytest.raises(OutsideRootError, match="outside"):
        video.make_folder(tmp_path / "elsewhere", root)
    assert untouched(outside) and not (tmp_path / "elsewhere").exists()
