"""Independent readers for the files the workflows write (PyAV for mp4/webm, Pillow for
webp/gif), and helpers to point converted workflows at the demo weights."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

# Small shapes for CPU runs: 13 frames (6k+1) = 3 latent frames, 64×48 = 8×6 latent pixels.
DEMO_SHAPE = {"width": 64, "height": 48, "frames": 13, "steps": 2}


@dataclass
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    metadata: dict


def read_video(path: Path) -> VideoInfo:
    """Decode every frame of a video file and report what it holds."""
    if path.suffix in (".webp", ".gif"):
        with Image.open(path) as im:
            durations = []
            for i in range(im.n_frames):
                im.seek(i)
                im.load()
                durations.append(im.info.get("duration", 0))
            meta = {k: v for k, v in im.info.items() if isinstance(v, (str, bytes))}
            exif = im.getexif()
            if 0x010E in exif:
                meta["ImageDescription"] = exif[0x010E]
            fps = 1000.0 / (sum(durations) / len(durations)) if sum(durations) else 0.0
            return VideoInfo(im.n_frames, fps, im.size[0], im.size[1], meta)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        meta = dict(container.metadata)
        return VideoInfo(frames, float(rate), stream.codec_context.width,
                         stream.codec_context.height, meta)


def decode_frames(path: Path):
    """Every frame of an mp4/webm as one ``F × H × W × 3`` uint8 array."""
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def point_at_demo(prompt: dict, names: dict[str, str], shape: dict | None = None) -> dict:
    """A copy of an API prompt with every model file replaced by the demo weights and the video
    shrunk to ``shape`` (width, height, frames, steps)."""
    shape = {**DEMO_SHAPE, **(shape or {})}
    prompt = copy.deepcopy(prompt)
    files = {"Mochi1DiTLoader": ("dit_name", "dit"), "Mochi1VAELoader": ("vae_name", "vae"),
             "Mochi1TextEncoderLoader": ("t5_name", "t5"), "CLIPLoader": ("clip_name", "t5"),
             "VAELoader": ("vae_name", "vae")}
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in files:
            key, role = files[kind]
            inputs[key] = names[role]
        elif kind == "Mochi1Sampler":
            inputs.update({k: shape[k] for k in ("width", "height", "frames", "steps")})
        elif kind == "EmptyMochiLatentVideo":
            inputs.update(width=shape["width"], height=shape["height"], length=shape["frames"])
        elif kind == "ImageScale":
            factor = 2 if inputs["width"] > 848 else 1  # the chaining workflow upscales 2x
            inputs.update(width=shape["width"] * factor, height=shape["height"] * factor)
    return prompt


def saved_files(server, entry: dict) -> dict[str, list[dict]]:
    """``{node id: [{path, format, fps, frames}, ...]}`` of the videos a finished prompt wrote
    (our ``mochi_video`` results and the host's animated ``images`` results)."""
    out = {}
    for node_id, ui in entry["outputs"].items():
        results = ui.get("mochi_video") or (ui.get("images") if ui.get("animated") else None)
        if not results:
            continue
        out[node_id] = [{**r, "path": server.output_dir / r.get("subfolder", "") / r["filename"]}
                        for r in results]
    return out


def embedded_prompt(info: VideoInfo) -> dict | None:
    """The API prompt a saver embedded in the file's metadata, if any."""
    for key in ("prompt", "comment", "ImageDescription"):
        raw = info.metadata.get(key)
        if raw is None:
            continue
        data = json.loads(raw)
        if key != "prompt" and isinstance(data, dict) and "prompt" in data:
            data = data["prompt"]
        return json.loads(data) if isinstance(data, str) else data
    return None
