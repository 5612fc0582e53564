"""``python -m mochi_core``: the whole pipeline on demo weights, and validation before loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert "--fps must be from 1 to 60, got 0" in err


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


# --------------------------------------------------------------------------------------------
# Every option: a bad value exits 2 naming the option and what is allowed, before any loading


@pytest.fixture
def nothing_loads(monkeypatch, tmp_path):
    """Make generating, and writing the demo weights, fail the test if the CLI gets that far."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the CLI went on to load or write models after a bad option")

    monkeypatch.setattr("mochi_core.pipeline.generate", refuse)
    monkeypatch.setattr("mochi_core.demo.make_demo_checkpoints", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


SEED_RANGE = "--seed must be an integer from 0 to 18446744073709551615"
BAD_VALUES = [
    (("--fps", "1e9"), "--fps must be from 1 to 60, got 1e+09"),
    (("--fps", "0.5"), "--fps must be from 1 to 60, got 0.5"),
    (("--fps", "nan"), "--fps must be from 1 to 60, got nan"),
    (("--fps", "inf"), "--fps must be from 1 to 60, got inf"),
    (("--fps", "fast"), "argument --fps: 'fast' is not a number; allowed: 1 to 60"),
    (("--seed", "-1"), SEED_RANGE),
    (("--seed", str(2**64)), SEED_RANGE),
    (("--seed", "1.5"), "argument --seed: '1.5' is not an integer; allowed: 0 to 1844"),
    (("--cfg", "nan"), "--cfg must be from 0 to 30"),
    (("--cfg", "inf"), "--cfg must be from 0 to 30"),
    (("--cfg", "-1"), "--cfg must be from 0 to 30"),
    (("--steps", "0"), "--steps must be an integer from 1 to 1000, got 0"),
    (("--steps", "1001"), "--steps must be an integer from 1 to 1000, got 1001"),
    (("--width", "4112"), "--width must be a positive multiple of 16 up to 4096"),
    (("--height", "0"), "--height must be a positive multiple of 16 up to 4096"),
    (("--width", "abc"), "argument --width: 'abc' is not an integer; allowed: a multiple of 16"),
    (("--frames", "1"), "--frames must be 6k+1 from 7 to 361"),
    (("--frames", "367"), "--frames must be 6k+1 from 7 to 361"),
    (("--quality", "101"), "--quality must be in 0..100, got 101"),
    (("--decode-chunk", "0"), "--decode-chunk must be 1 or more"),
    (("--decode-tile", "16"), "--decode-tile must be 0 or a multiple of 8, got 16 (0 = whole "
                              "frames; otherwise 40 to 4096)"),
    (("--decode-tile", "4104"), "--decode-tile must be 0 or a multiple of 8, got 4104"),
    (("--dit-tile", "4112"), "--dit-tile must be 0 or a multiple of 16, got 4112 (at most 4096)"),
    (("--dit-tile", "64"), "--dit-tile-overlap 128: the overlap must be smaller than the tile"),
    (("--device", "nonsense"), "--device must be cpu, cuda, cuda:N or mps, got 'nonsense'"),
    (("--device", "cuda:99"), "--device cuda:99: this machine has"),
    (("--attention", "xformers"), "argument --attention: invalid choice: 'xformers'"),
    (("--prompt", "x" * 20_001), "--prompt is 20,001 characters long; at most 20,000"),
    (("--negative-prompt", "a\x00b"), "--negative-prompt holds a NUL character"),
    (("--prompt", "bad \udcff byte"), "--prompt is not valid Unicode text"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_every_bad_value_is_refused_before_loading(args, message, tmp_path, nothing_loads,
                                                   capsys):  # fmt: skip
    out = tmp_path / "never.mp4"
    err = run_main_expecting_error("--demo", "--output", str(out), *args, capsys=capsys)
    assert message in err, err
    assert "Traceback" not in err
    assert not out.exists(), "the output probe must leave nothing behind"


def _output_cases(tmp: Path) -> list[tuple[str, str]]:
    (tmp / "a_file.txt").write_text("x")
    (tmp / "dangling.mp4").symlink_to(tmp / "nowhere")
    return [
        (str(tmp / "no_such_folder" / "x.mp4"), "the folder %s does not exist (create it first)"
         % (tmp / "no_such_folder")),
        (str(tmp), f"--output {tmp} names a folder; give a file name in it"),
        (str(tmp / "new.mp4") + "/", "names a folder; give a file name in it"),
        (str(tmp / "a_file.txt" / "x.mp4"), "a_file.txt is not a folder"),
        ("/proc/mochi_cli_test.mp4", "--output /proc/mochi_cli_test.mp4: cannot create a file "
                                     "in /proc"),
        (str(tmp / ("n" * 250 + ".mp4")), "--output file name is too long: at most 200 bytes"),
        (str(tmp / "dangling.mp4"), "already exists (never overwritten)"),
        (str(tmp / ".mp4"), "--output must end in one of .mp4, .webm, .gif, .webp"),
        ("", "--output must be a file name ending in one of .mp4, .webm, .gif, .webp"),
        (str(tmp / "nul\x00.mp4"), "--output must be a file name ending in one of .mp4"),
    ]  # fmt: skip


def test_every_bad_output_is_refused_before_loading(tmp_path, nothing_loads, capsys):
    """A missing or unwritable folder, a folder, a name too long, an existing (even dangling)
    link: refused at once instead of after the whole generation."""
    for output, message in _output_cases(tmp_path):
        err = run_main_expecting_error("--demo", "--output", output, capsys=capsys)
        assert message in err, (output, err)
    assert not (tmp_path / "nowhere").exists(), "the dangling link was followed"


def test_a_tokenizer_that_cannot_be_read_is_refused_before_loading(tmp_path, nothing_loads,
                                                                    capsys):  # fmt: skip
    """--tokenizer is used (also with --demo) and read before anything else is loaded."""
    bogus = tmp_path / "tokenizer"
    bogus.mkdir()
    (bogus / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    err = run_main_expecting_error("--demo", "--tokenizer", str(bogus), "--output",
                                   str(tmp_path / "o.mp4"), capsys=capsys)  # fmt: skip
    assert f"--tokenizer {bogus}: its tokenizer.json cannot be read as the T5 v1.1" in err, err
    err = run_main_expecting_error("--demo", "--tokenizer", str(tmp_path / "none"),
                                   "--output", str(tmp_path / "o.mp4"), capsys=capsys)
    assert "--tokenizer: T5 tokenizer not found" in err


@pytest.fixture
def demo_files(tmp_path):
    from mochi_core.demo import make_demo_checkpoints  # noqa: PLC0415

    return make_demo_checkpoints(tmp_path / "demo", seed=1)


def _real(files, **swap) -> list[str]:
    paths = {"dit": files.dit, "vae": files.vae, "t5": files.t5, **swap}
    return ["--prompt", "a cat", *[a for k, v in paths.items() for a in (f"--{k}", str(v))]]


def test_wrong_checkpoint_files_are_named_from_their_headers(tmp_path, demo_files,
                                                             nothing_loads, capsys):  # fmt: skip
    """A VAE given as the DiT, a DiT as the VAE or the T5, a folder, a pickle, garbage: each is
    refused from its header, before anything is loaded."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    cases = [
        ({"dit": demo_files.vae}, "--dit: mochi_demo_vae.safetensors: not a Mochi DiT"),
        ({"vae": demo_files.dit}, "--vae " + str(demo_files.dit) + ": no Mochi VAE decoder"),
        ({"t5": demo_files.dit}, "--t5: mochi_demo_dit.safetensors: no T5-XXL encoder found"),
        ({"dit": garbage}, "--dit: garbage.safetensors"),
        ({"dit": pickled}, "--dit: model.ckpt"),
        ({"dit": tmp_path}, "--dit: "),
        ({"t5": "t5\x00.safetensors"}, "--t5: a path cannot hold a NUL character"),
    ]
    for swap, message in cases:
        out = tmp_path / "o.mp4"
        err = run_main_expecting_error(*_real(demo_files, **swap), "--output", str(out),
                                       capsys=capsys)  # fmt: skip
        assert message in err, (swap, err)


def test_a_t5_of_another_width_is_refused_before_loading(tmp_path, demo_files, nothing_loads,
                                                          capsys):  # fmt: skip
    from safetensors.torch import save_file  # noqa: PLC0415

    from mochi_core.demo import DemoT5Size, random_t5_state_dict  # noqa: PLC0415

    narrow = tmp_path / "t5_narrow.safetensors"
    save_file(random_t5_state_dict(0, DemoT5Size(d_model=32)), str(narrow))
    err = run_main_expecting_error(*_real(demo_files, t5=narrow), "--output",
                                   str(tmp_path / "o.mp4"), capsys=capsys)  # fmt: skip
    assert "--t5 t5_narrow.safetensors gives 32-d features but --dit " in err
    assert "expects 64-d" in err


def test_a_checkpoint_that_fails_to_load_exits_1_without_a_traceback(tmp_path, demo_files,
                                                                      capsys):  # fmt: skip
    """A DiT whose header looks right but lacks a tensor fails in the loader: the message, no
    traceback, no file."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    sd = load_file(str(demo_files.dit))
    del sd["final_layer.linear.weight"]
    broken = tmp_path / "broken_dit.safetensors"
    save_file(sd, str(broken))
    out = tmp_path / "o.mp4"
    code = main([*_real(demo_files, dit=broken), "--output", str(out), "--steps", "1",
                 "--frames", "7", "--width", "32", "--height", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "mochi_core: error: broken_dit.safetensors" in err, err
    assert "final_layer.linear.weight" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_output_folder_exits_2_before_the_demo_weights_are_written(tmp_path):
    out = tmp_path / "no_such_folder" / "demo.mp4"
    proc = run_cli("--demo", "--output", str(out), cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--output {out}: the folder {out.parent} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "ffmpeg" not in proc.stderr
    assert not (tmp_path / "cache").exists(), "demo weights were written before the refusal"


def test_scripts_mochi_runs_from_any_directory(tmp_path):
    """``scripts/mochi`` needs neither an install nor the repository as working directory; a
    relative --output is relative to the caller's directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "mochi"), "--demo", "--frames", "7", "--steps", "1",
         "--width", "32", "--height", "32", "--output", "here.mp4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_video_info(tmp_path / "here.mp4")[0] == 7
    bad = subprocess.run([str(ROOT / "scripts" / "mochi"), "--fps", "1e9"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("usage: mochi ")


def test_the_package_declares_the_mochi_command():
    import importlib  # noqa: PLC0415

    import tomllib  # noqa: PLC0415

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["mochi"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
