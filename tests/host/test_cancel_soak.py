"""Cancel and soak inside the real server (issue 5 items 4 and 5).

A ``POST /interrupt`` during decoding ends the prompt within one (tile, chunk) step, writes no
video, the next prompt runs, and the server's resident memory comes back to its level before
the run. Twenty prompts in a row, every third cancelled while it runs: every finished video is
valid, and memory, threads and open files stay level.

Memory is the resident set (RSS) of the server process and its children, measured with psutil.
glibc keeps freed memory in its heaps (its mmap threshold rises after large frees, and the
decoder's tile buffers are below it): without a trim, RSS after a cancelled decode differed from
RSS before by -49 to +145 MB over six runs, while glibc's own count of bytes in use
(``malloc_stats()``, mmapped chunks included) moved by less than 0.1 MB. The decode node
therefore hands freed pages back with ``malloc_trim`` when it ends (``return_freed_memory``);
since then RSS comes back within ±33 MB (measured over nine runs), and the tolerance is 64 MB.
The cancelled decode allocates a 624 MB output buffer: an exception traceback or a cache that
kept the decode's tensors alive would keep that buffer, far above the tolerance.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.host.media import read_video, saved_files
from tests.host.test_errors import base_prompt
from tests.host.ws import WsWatcher

pytestmark = pytest.mark.host

MB = 2**20
# The cancelled decode: 2048×2048, 13 frames in 128 px tiles (19 × 19 tiles, 2 chunks each, 722
# steps of about 0.35 s on two cores); its fp32 output buffer is 3 × 13 × 2048 × 2048 × 4 bytes.
BIG_SIDE, TILE, FRAMES = 2048, 128, 13
STEPS_PER_TILE = 2  # 13 frames are 3 latent frames: chunks of 2 and 1 (7 and 6 frames)
OUTPUT_BUFFER_MB = 3 * FRAMES * BIG_SIDE * BIG_SIDE * 4 / MB
# RSS after the cancelled run may differ from before by what glibc still holds after the trim
# (module docstring: within ±33 MB measured); a kept 624 MB buffer is ten times the tolerance.
CANCEL_TOLERANCE_MB = 64
SOAK_PROMPTS, CANCEL_EVERY, SOAK_GROWTH = 20, 3, 0.05
FIGURES = ROOT / "test-artifacts" / "cancel_soak.json"


def record(name: str, figures: dict) -> None:
    """Keep a test's measured figures in ``test-artifacts/cancel_soak.json`` (for the notes)."""
    FIGURES.parent.mkdir(exist_ok=True)
    data = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    data[name] = figures
    FIGURES.write_text(json.dumps(data, indent=1))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:  # a child (ffmpeg) that has just exited
            pass
    return total / MB


class PeakRss:
    """The highest RSS of a process seen every 20 ms while the block runs, in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def decode_prompt(files: dict[str, str], side: int, prefix: str) -> dict:
    """The host's EmptyMochiLatentVideo (side × side, 13 frames) → our tiled decoder → mp4."""
    return {
        "vae": {"class_type": "Mochi1VAELoader", "inputs": {
            "vae_name": files["vae"], "second_file": "none", "dtype": "fp32"}},
        "empty": {"class_type": "EmptyMochiLatentVideo", "inputs": {
            "width": side, "height": side, "length": FRAMES, "batch_size": 1}},
        "decode": {"class_type": "Mochi1VAEDecode", "inputs": {
            "decoder": ["vae", 0], "samples": ["empty", 0], "tile_size": TILE,
            "tile_overlap": 16, "frame_chunk": 2}},
        "save": {"class_type": "Mochi1SaveVideo", "inputs": {
            "images": ["decode", 0], "fps": 30.0, "format": "mp4 (H.264)", "quality": 85,
            "filename_prefix": prefix}},
    }


def written(comfy, prefix: str) -> list[Path]:
    folder = comfy.output_dir / Path(prefix).parent
    return sorted(folder.glob(Path(prefix).name + "*")) if folder.is_dir() else []


def messages(entry: dict, kind: str) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == kind]


def cancel_when(comfy, ws: WsWatcher, prompt: dict, node: str, after: int) -> tuple[dict, dict]:
    """Queue ``prompt``, interrupt it (by its id) once ``node`` reported ``after`` steps; its
    history entry and ``{done_at_interrupt, done, total, seconds}`` (steps, time to stop)."""
    status, body = comfy.queue(prompt)
    assert status == 200, body
    prompt_id = body["prompt_id"]
    ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("node") == node
                and m["data"].get("prompt_id") == prompt_id and m["data"]["value"] >= after)
    done_at_interrupt = max(v for v, _ in ws.progress(prompt_id, node))
    sent = time.monotonic()
    status, _ = comfy.request("/interrupt", {"prompt_id": prompt_id})
    assert status == 200
    entry = comfy.wait(prompt_id, timeout=120)
    steps = ws.progress(prompt_id, node)
    return entry, {"done_at_interrupt": done_at_interrupt, "done": max(v for v, _ in steps),
                   "total": steps[-1][1], "seconds": round(time.monotonic() - sent, 2)}


def assert_video(comfy, entry: dict, frames: int, width: int, height: int) -> Path:
    """The prompt succeeded and its one mp4 decodes to ``frames`` frames of the given size."""
    assert entry["status"]["status_str"] == "success", entry["status"]
    (result,) = saved_files(comfy, entry)["save"]
    info = read_video(result["path"])
    assert (info.frames, info.width, info.height) == (frames, width, height), info
    return result["path"]


def test_interrupt_during_decoding_stops_within_one_tile_and_frees_the_memory(comfy):
    pid, files = comfy.process.pid, comfy.demo_files
    # Warm-up: the VAE decodes one tile of the same size (2 steps), the DiT and T5 run once.
    assert_video(comfy, comfy.run(decode_prompt(files, TILE, "Mochi1/cancel_warmup")),
                 FRAMES, TILE, TILE)
    assert_video(comfy, comfy.run(base_prompt(files, seed=6001)), 13, 64, 48)
    before = rss_mb(pid)

    with PeakRss(pid) as peak, WsWatcher(comfy.url) as ws:
        entry, steps = cancel_when(comfy, ws, decode_prompt(files, BIG_SIDE, "Mochi1/cancelled"),
                                   "decode", after=2 * STEPS_PER_TILE)
        nxt = comfy.run(base_prompt(files, seed=6002))
    after = rss_mb(pid)

    figures = (f"RSS before {before:.0f} MB, peak {peak.peak:.0f} MB, after {after:.0f} MB "
               f"(after - before {after - before:+.0f} MB, tolerance {CANCEL_TOLERANCE_MB} MB, "
               f"output buffer {OUTPUT_BUFFER_MB:.0f} MB); decode steps: {steps}")
    print(figures)
    record("cancel_decode", {"rss_before_mb": round(before), "rss_peak_mb": round(peak.peak),
                             "rss_after_mb": round(after), **steps})
    (stop,) = messages(entry, "execution_interrupted")
    assert stop["node_type"] == "Mochi1VAEDecode", stop
    assert steps["done"] <= steps["done_at_interrupt"] + 1, figures  # one (tile, chunk) step
    assert steps["total"] == 19 * 19 * STEPS_PER_TILE and steps["seconds"] < 30, figures
    assert "save" not in entry["outputs"] and written(comfy, "Mochi1/cancelled") == []
    assert_video(comfy, nxt, 13, 64, 48)
    # The run did hold its output buffer (so a kept buffer would show), and let it go.
    assert peak.peak - before > 0.9 * OUTPUT_BUFFER_MB, figures
    assert abs(after - before) < CANCEL_TOLERANCE_MB, figures


def process_figures(pid: int) -> dict:
    """RSS (MB), threads, open descriptors, open regular files and child processes."""
    proc = psutil.Process(pid)
    return {"rss": rss_mb(pid), "threads": proc.num_threads(), "fds": proc.num_fds(),
            "files": sorted(f.path for f in proc.open_files()),
            "children": len(proc.children(recursive=True))}


def settled(pid: int, baseline: dict, timeout: float = 5.0) -> dict:
    """Figures once threads, descriptors and children are back to ``baseline`` (a socket or a
    thread may take a moment to close after a response), or the last figures at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        now = process_figures(pid)
        level = all(now[k] <= baseline[k] for k in ("threads", "fds", "children"))
        if level or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def soak_prompt(comfy, ws: WsWatcher, index: int) -> tuple[dict, bool]:
    """Prompt ``index`` of the soak (seed 7000 + index): a normal 2-step run, or every third a
    300-step run interrupted once its sampler reported a step. ``(entry, cancelled)``."""
    if index % CANCEL_EVERY:
        prompt = base_prompt(comfy.demo_files, seed=7000 + index)
        prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/soak"
        return comfy.run(prompt), False
    prompt = base_prompt(comfy.demo_files, seed=7000 + index, steps=300)
    prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/soak_cancelled"
    entry, _ = cancel_when(comfy, ws, prompt, "sampler", after=1)
    return entry, True


def test_soak_twenty_prompts_every_third_cancelled(comfy):
    pid, rss, videos, cancelled = comfy.process.pid, [], [], 0
    with WsWatcher(comfy.url) as ws:
        for index in range(1, SOAK_PROMPTS + 1):
            entry, was_cancelled = soak_prompt(comfy, ws, index)
            assert all("sampler" not in m["nodes"] for m in messages(entry, "execution_cached"))
            if was_cancelled:
                (stop,) = messages(entry, "execution_interrupted")
                assert stop["node_type"] == "Mochi1Sampler", stop
                cancelled += 1
            else:
                videos.append(assert_video(comfy, entry, 13, 64, 48))
            rss.append(rss_mb(pid))
            if index == CANCEL_EVERY:
                start = process_figures(pid)
        end = settled(pid, start)

    growth = (end["rss"] - start["rss"]) / start["rss"]
    figures = (f"{len(videos)} completed, {cancelled} cancelled; RSS after prompt {CANCEL_EVERY} "
               f"{start['rss']:.0f} MB, after prompt {SOAK_PROMPTS} {end['rss']:.0f} MB "
               f"({growth:+.1%}); threads {start['threads']} -> {end['threads']}, fds "
               f"{start['fds']} -> {end['fds']}, children {start['children']} -> "
               f"{end['children']}; RSS per prompt (MB): {[round(r) for r in rss]}")
    print(figures)
    record("soak", {"completed": len(videos), "cancelled": cancelled,
                    "rss_after_3rd_mb": round(start["rss"]), "rss_after_20th_mb": round(end["rss"]),
                    "growth": round(growth, 4), "rss_per_prompt_mb": [round(r) for r in rss],
                    **{k: [start[k], end[k]] for k in ("threads", "fds", "children")}})
    assert (len(videos), cancelled) == (14, 6), figures
    assert len(set(videos)) == len(videos), "a completed prompt did not write its own video"
    assert written(comfy, "Mochi1/soak_cancelled") == [], "a cancelled prompt wrote a video"
    assert growth < SOAK_GROWTH, figures
    assert end["threads"] <= start["threads"] and end["children"] <= start["children"], figures
    assert end["fds"] <= start["fds"] and end["files"] == start["files"], figures
