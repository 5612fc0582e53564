"""``python -m mochi_core``: the whole pipeline on demo weights, and validation before loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import av

from mochi_core.demo import DEMO_TAG
from mochi_core.video import read_video_info
from tests.conftest import ROOT


def run_cli(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(cache),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mochi_core", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_writes_a_playable_labelled_mp4(tmp_path):
    out = tmp_path / "demo.mp4"
    proc = run_cli("--demo", "--frames", "13", "--fps", "24", "--seed", "5",
                   "--output", str(out), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == str(out)
    assert "DEMO" in proc.stdout and "peak memory" in proc.stdout
    frames, fps, w, h = read_video_info(out)
    assert (frames, fps, w, h) == (13, 24.0, 128, 96)
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert DEMO_TAG in c.metadata and c.metadata["seed"] == "5"
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 13
    assert decoded[0].std() > 1.0, "the decoded video is flat"
    assert json.loads(c.metadata["checkpoints"])["dit"] == "mochi_demo_dit.safetensors"
    assert "random" in proc.stderr.lower()  # the log says so, too


def test_invalid_options_fail_before_loading_anything(tmp_path):
    existing = tmp_path / "taken.mp4"
    existing.write_bytes(b"keep")
    cache = tmp_path / "cache"
    proc = run_cli("--demo", "--frames", "84", "--width", "850", "--output", str(existing),
                   cache=cache)
    assert proc.returncode == 2
    assert "--frames must be 6k+1" in proc.stderr and "79 or 85" in proc.stderr
    assert "--width must be a positive multiple of 16" in proc.stderr
    assert "already exists" in proc.stderr
    assert existing.read_bytes() == b"keep"
    assert not cache.exists(), "demo weights were written before validation failed"


def test_real_mode_requires_checkpoints(tmp_path):
    proc = run_cli("--prompt", "a cat", "--dit", str(tmp_path / "missing.safetensors"),
                   "--output", str(tmp_path / "o.mp4"), cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert "missing.safetensors: no such file" in proc.stderr
    assert "--vae is required" in proc.stderr and "--t5 is required" in proc.stderr
