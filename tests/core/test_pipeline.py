"""``pipeline.generate`` with the DiT options: exact ones must not change the video."""

from __future__ import annotations

import pytest
import torch

from mochi_core.__main__ import main
from mochi_core.demo import make_demo_checkpoints
from mochi_core.pipeline import CheckpointPaths, DiTOptions, GenerationSettings, generate
from mochi_core.tiled_sampling import TileOptions

SETTINGS = GenerationSettings(prompt="a cat", width=64, height=48, frames=7, steps=2, cfg=4.5,
                              seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory) -> CheckpointPaths:
    demo = make_demo_checkpoints(tmp_path_factory.mktemp("demo"), seed=0)
    return CheckpointPaths(demo.dit, demo.vae, demo.t5)


def test_offload_and_one_covering_tile_leave_the_video_unchanged(demo_paths):
    plain = generate(demo_paths, SETTINGS)
    whole = TileOptions(tile=(SETTINGS.height // 8, SETTINGS.width // 8), overlap=2)
    options = DiTOptions(tiling=whole, offload_resident=1)
    streamed = generate(demo_paths, SETTINGS, dit=options, frames_per_chunk=1)
    assert torch.equal(plain.latents, streamed.latents)
    assert (plain.frames.int() - streamed.frames.int()).abs().max() <= 1  # uint8 rounding


def test_small_tiles_and_bf16_storage_change_the_result_but_run(demo_paths):
    plain = generate(demo_paths, SETTINGS)
    options = DiTOptions(dtype=torch.bfloat16, tiling=TileOptions(tile=(4, 4), overlap=2))
    tiled = generate(demo_paths, SETTINGS, dit=options)
    assert tiled.frames.shape == plain.frames.shape == (7, 48, 64, 3)
    assert torch.isfinite(tiled.latents).all()
    assert not torch.equal(plain.latents, tiled.latents)


def test_bad_dit_options_are_refused_before_loading(tmp_path):
    missing = CheckpointPaths(tmp_path / "no_dit", tmp_path / "no_vae", tmp_path / "no_t5")
    with pytest.raises(ValueError, match="offload_resident must be >= 1"):
        generate(missing, SETTINGS, dit=DiTOptions(offload_resident=0))


@pytest.mark.parametrize(("args", "message"), [
    (("--dit-tile", "100"), "--dit-tile must be 0 or a multiple of 16, got 100"),
    (("--dit-tile", "64", "--dit-tile-overlap", "64"), "overlap must be smaller than the tile"),
    (("--decode-tile", "12"), "--decode-tile must be 0 or a multiple of 8, got 12"),
    (("--offload-blocks", "-1"), "--offload-blocks must be >= 0"),
    (("--weight-dtype", "fp16"), "invalid choice: 'fp16'"),
])  # fmt: skip
def test_cli_refuses_bad_dit_options(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--output", str(tmp_path / "x.mp4"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists(), "nothing may be written before validation"
