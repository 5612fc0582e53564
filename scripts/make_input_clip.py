"""Write ``workflows/mochi1_input.mp4``: the small clip the video-to-video template loads.

15 frames (not 6k+1, so the template's trim to 13 frames is exercised) of 64×48 pixels at
24 fps: a colour gradient with a bright square moving across it, so the motion is visible in
the output. The launcher (``scripts/start_ui.py``), the main job and the tests copy it into
the server's ``input/`` folder; in your own ComfyUI, copy it into ``ComfyUI/input``.

Usage: .venv/bin/python scripts/make_input_clip.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP = ROOT / "workflows" / "mochi1_input.mp4"
FRAMES, WIDTH, HEIGHT, FPS = 15, 64, 48, 24
SQUARE = 12


def clip_frames() -> np.ndarray:
    """``FRAMES × HEIGHT × WIDTH × 3`` uint8: a diagonal gradient and a square moving right."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    background = np.stack([x * 255 // (WIDTH - 1), y * 255 // (HEIGHT - 1),
                           np.full_like(x, 96)], axis=-1).astype(np.uint8)  # fmt: skip
    frames = np.repeat(background[None], FRAMES, axis=0)
    top = (HEIGHT - SQUARE) // 2
    for i, frame in enumerate(frames):
        left = i * (WIDTH - SQUARE) // (FRAMES - 1)
        frame[top:top + SQUARE, left:left + SQUARE] = 255
    return frames


def main() -> None:
    from mochi_core.video import write_video

    CLIP.unlink(missing_ok=True)  # the writer never overwrites
    write_video(clip_frames(), CLIP, fps=FPS, quality=85)
    print(f"wrote {CLIP.relative_to(ROOT)} ({CLIP.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
