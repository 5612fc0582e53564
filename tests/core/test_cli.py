"""``python -m mochi_core``: the whole pipeline on demo weights, and validation before loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import pytest
import torch

from mochi_core.__main__ import main
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
    proc = run_cli("--demo", "--frames", "13", "--fps", "24", "--seed", "5", "--steps", "3",
                   "--width", "64", "--height", "48", "--output", str(out),
                   cache=tmp_path / "cache")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == str(out)
    assert "DEMO" in proc.stdout and "peak memory" in proc.stdout
    frames, fps, w, h = read_video_info(out)
    assert (frames, fps, w, h) == (13, 24.0, 64, 48)
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert DEMO_TAG in c.metadata and c.metadata["seed"] == "5"
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 13
    assert decoded[0].std() > 1.0, "the decoded video is flat"
    assert json.loads(c.metadata["checkpoints"])["dit"] == "mochi_demo_dit.safetensors"
    assert "random" in proc.stderr.lower()  # the log says so, too


def run_main_expecting_error(*args: str, capsys) -> str:
    """Run the CLI in-process; it must exit with argparse's usage error (code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_invalid_options_fail_before_loading_anything(tmp_path, monkeypatch, capsys):
    existing = tmp_path / "taken.mp4"
    existing.write_bytes(b"keep")
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    err = run_main_expecting_error("--demo", "--frames", "84", "--width", "850",
                                   "--output", str(existing), "--dit", "x.safetensors",
                                   capsys=capsys)  # fmt: skip
    assert "--dit cannot be combined with --demo" in err
    assert "--frames must be 6k+1" in err and "79 or 85" in err
    assert "--width must be a positive multiple of 16" in err
    assert "already exists" in err
    assert existing.read_bytes() == b"keep"
    assert not cache.exists(), "demo weights were written before validation failed"


def test_real_mode_requires_checkpoints(tmp_path, capsys):
    err = run_main_expecting_error(
        "--prompt", "a cat", "--dit", str(tmp_path / "missing.safetensors"),
        "--output", str(tmp_path / "o.avi"), "--fps", "0", capsys=capsys)
    assert "missing.safetensors: no such file" in err
    assert "--vae is required" in err and "--t5 is required" in err
    assert "--output must end in one of .mp4, .webm, .gif, .webp" in err
    assert "--fps must be > 0" in err


def test_demo_checkpoints_load_through_the_real_loaders(tmp_path):
    from mochi_core.checkpoints import detect_file, load_dit, load_vae  # noqa: PLC0415
    from mochi_core.demo import is_demo_file, make_demo_checkpoints  # noqa: PLC0415
    from mochi_core.text import T5Conditioner  # noqa: PLC0415

    paths = make_demo_checkpoints(tmp_path, seed=4)
    assert all(is_demo_file(p) for p in (paths.dit, paths.vae, paths.t5))
    assert detect_file(paths.dit).name == "genmo"
    assert detect_file(paths.vae).name == "comfy_combined"
    assert detect_file(paths.t5).kind == "t5"
    dit = load_dit(paths.dit)
    assert (dit.config.depth, dit.config.hidden_size_x, dit.config.num_heads) == (2, 128, 2)
    vae = load_vae(paths.vae)
    assert vae.halves == ("encoder", "decoder")
    text = T5Conditioner.from_file(paths.t5)
    assert text.encoder.config.vocab_size == 32128
    assert text.encoder.shared.weight.dtype == torch.float32  # fp16 file, fp32 compute
    stamp = paths.dit.stat().st_mtime_ns
    assert make_demo_checkpoints(tmp_path, seed=4) == paths
    assert paths.dit.stat().st_mtime_ns == stamp, "an up-to-date demo set was rewritten"


def test_a_job_that_cannot_fit_exits_with_the_estimate_and_no_file(tmp_path):
    """``MOCHI_MEMORY_LIMIT_GB`` below the margin alone: the sampler refuses before a step."""
    out = tmp_path / "never.mp4"
    env = {"MOCHI_MEMORY_LIMIT_GB": "0.1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mochi_core", "--demo", "--frames", "13", "--steps", "2",
         "--width", "64", "--height", "48", "--output", str(out)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "c"), **env},
        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "mochi_core: error: this sampling job needs about" in proc.stderr
    assert "limited by MOCHI_MEMORY_LIMIT_GB=0.1" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
