"""Fits before it runs, inside the real server (issue 5 item 7).

A server of its own, started with ``MOCHI_MEMORY_LIMIT_GB=0.8``: a sampler or decoder job whose
estimate exceeds it ends in an ``execution_error`` before any step or tile runs, naming the
estimate and the options that would fit; an option it names does run; a decode that fits only in
smaller frame chunks takes them by itself; the server then runs a valid prompt.
"""

from __future__ import annotations

import re
import uuid

import pytest

from scripts.comfy_server import fill_demo_models, seed_base, start_server, stop_server
from tests.host.media import read_video, saved_files
from tests.host.test_errors import base_prompt
from tests.host.test_reliability import execution_error
from tests.host.ws import WsWatcher

pytestmark = pytest.mark.host

LIMIT_GB = "0.8"


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    base = tmp_path_factory.mktemp(f"limited-{uuid.uuid4().hex[:6]}")
    seed_base(base)
    names = fill_demo_models(base / "models")
    server = start_server(base, env={"MOCHI_MEMORY_LIMIT_GB": LIMIT_GB})
    server.demo_files = names
    yield server
    stop_server(server)


def decode_only(server, width: int, height: int, frames: int, tile_size: int = 0,
                prefix: str = "fit/decode") -> dict:
    """The host's EmptyMochiLatentVideo → our decoder → our saver."""
    prompt = base_prompt(server.demo_files)
    for node in ("dit", "t5", "text", "sampler"):
        del prompt[node]
    prompt["empty"] = {"class_type": "EmptyMochiLatentVideo", "inputs": {
        "width": width, "height": height, "length": frames, "batch_size": 1}}
    prompt["decode"]["inputs"].update(samples=["empty", 0], tile_size=tile_size)
    prompt["save"]["inputs"].update(filename_prefix=prefix, format="webp (animated)")
    return prompt


def outputs(server) -> list[str]:
    return sorted(str(p) for p in server.output_dir.rglob("*") if p.is_file())


def test_a_decode_that_cannot_fit_is_refused_and_the_tile_it_names_runs(limited):
    before = outputs(limited)
    with WsWatcher(limited.url) as ws:
        entry = limited.run(decode_only(limited, 512, 512, 13))
        assert ws.progress(entry["prompt"][1], "decode") == [], "a tile ran before the refusal"
    error = execution_error(entry)
    assert error["node_type"] == "Mochi1VAEDecode"
    assert error["exception_type"].endswith("InsufficientMemoryError"), error["exception_type"]
    message = error["exception_message"]
    for words in ("13 frames of 512×512", "even one latent frame at a time", "GiB is free",
                  f"MOCHI_MEMORY_LIMIT_GB={LIMIT_GB}", "Options that would fit: tile_size"):
        assert words in message, message
    assert outputs(limited) == before

    tile = int(re.search(r"tile_size (\d+)", message).group(1))
    entry = limited.run(decode_only(limited, 512, 512, 13, tile_size=tile))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (video,) = saved_files(limited, entry)["save"]
    info = read_video(video["path"])
    assert (info.frames, info.width, info.height) == (13, 512, 512)


def test_a_decode_that_fits_in_smaller_chunks_takes_them(limited):
    entry = limited.run(decode_only(limited, 256, 256, 13, prefix="fit/chunked"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "latent frames per chunk instead of all" in limited.log()
    (video,) = saved_files(limited, entry)["save"]
    assert read_video(video["path"]).frames == 13


def test_a_sampler_job_that_cannot_fit_is_refused_before_any_step(limited):
    prompt = base_prompt(limited.demo_files, width=848, height=480, frames=163, steps=2)
    prompt["save"]["inputs"]["filename_prefix"] = "fit/sampler"
    before = outputs(limited)
    with WsWatcher(limited.url) as ws:
        entry = limited.run(prompt)
        assert ws.progress(entry["prompt"][1], "sampler") == [], "a step ran before the refusal"
    error = execution_error(entry)
    assert error["node_type"] == "Mochi1Sampler"
    assert error["exception_type"].endswith("InsufficientMemoryError")
    message = error["exception_message"]
    for words in ("44,520 video tokens", "batch 2", "GiB is free", "Options that would fit",
                  "DiT tiling with", "smaller width, height or frame count"):
        assert words in message, message
    assert outputs(limited) == before

    entry = limited.run(base_prompt(limited.demo_files, seed=41))
    assert entry["status"]["status_str"] == "success", entry["status"]
