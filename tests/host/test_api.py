"""The generation HTTP API (``/mochi/v1``) against the real server, with real HTTP clients.

The session server runs with the API on (``harness.API_SETTINGS``: a key, 64×48, queue limit 4);
a second server, without a key, checks that the routes are off and that the settings file turns
them on. Runs use 10 steps (the API's minimum) at 64×48 on the demo weights.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from mochi_api.request import snap_frames
from scripts.comfy_server import seed_base, start_server, stop_server
from tests.host.harness import API_KEY, API_SETTINGS
from tests.host.media import decode_frames, read_video

pytestmark = pytest.mark.host

API = "/mochi/v1"
WIDTH, HEIGHT = int(API_SETTINGS["MOCHI_API_WIDTH"]), int(API_SETTINGS["MOCHI_API_HEIGHT"])
MAX_QUEUE = int(API_SETTINGS["MOCHI_API_MAX_QUEUE"])
SMALL = {"prompt": "a red fox in the snow", "frames": 7, "steps": 10}


def post(server, body, key: str | None = API_KEY, query: str = "", **kwargs):
    headers = {} if key is None else {"x-api-key": key}
    return requests.post(f"{server.url}{API}/generate{query}", json=body, headers=headers,
                         timeout=kwargs.pop("timeout", 120), **kwargs)


def get(server, path: str, key: str | None = API_KEY):
    headers = {} if key is None else {"x-api-key": key}
    return requests.get(f"{server.url}{API}{path}", headers=headers, timeout=30)


def wait_done(server, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = get(server, f"/jobs/{job_id}").json()
        if status["status"] not in ("queued", "running"):
            return status
        time.sleep(0.25)
    raise TimeoutError(job_id)


def check_mp4(data: bytes, tmp_path: Path, frames: int, fps: int):
    """The bytes are a playable MP4: every frame decodes, with the expected count, rate, size."""
    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(data)
    info = read_video(path)
    assert (info.frames, info.width, info.height) == (frames, WIDTH, HEIGHT)
    assert info.fps == pytest.approx(fps, rel=0.01)
    assert decode_frames(path).shape == (frames, HEIGHT, WIDTH, 3)


@pytest.mark.parametrize("frames", range(1, 161))
def test_frames_snap_to_the_nearest_6k_plus_1(frames):
    valid = range(7, 161, 6)
    nearest = min(valid, key=lambda n: (abs(n - frames), n))  # ties go to the lower count
    assert snap_frames(frames) == nearest


def test_async_job_polls_and_returns_a_playable_mp4(comfy, tmp_path):
    r = post(comfy, {**SMALL, "frames": 14, "fps": 12, "seed": 7, "guidance_scale": 6,
                     "negative_prompt": "blurry"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["frames"], job["requested_frames"], job["fps"], job["seed"]) == (13, 14, 12, 7)
    assert (job["width"], job["height"], job["steps"]) == (WIDTH, HEIGHT, 10)
    assert job["status"] in ("queued", "running")
    early = get(comfy, f"/jobs/{job['id']}/video")  # the run takes seconds
    assert early.status_code == 409 and early.json()["status"] in ("queued", "running")
    done = wait_done(comfy, job["id"])
    assert done["status"] == "succeeded", done
    video = get(comfy, f"/jobs/{job['id']}/video")
    assert video.status_code == 200
    assert video.headers["Content-Type"] == "video/mp4"
    assert video.headers["X-Frames"] == "13" and video.headers["X-Fps"] == "12"
    check_mp4(video.content, tmp_path, frames=13, fps=12)


def test_sync_mode_returns_the_mp4_with_the_issue_defaults(comfy, tmp_path):
    """No frames/fps given: 52 frames snap to 49, 16 fps; the host's /api prefix works too."""
    r = requests.post(f"{comfy.url}/api{API}/generate?sync=true", timeout=180,
                      json={"prompt": "waves at dusk", "steps": 10},
                      headers={"x-api-key": API_KEY})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "video/mp4"
    assert (r.headers["X-Frames"], r.headers["X-Fps"]) == ("49", "16")
    check_mp4(r.content, tmp_path, frames=49, fps=16)
    status = get(comfy, f"/jobs/{r.headers['X-Job-Id']}").json()
    assert status["status"] == "succeeded" and status["guidance_scale"] == 4.5


def test_concurrent_calls_queue_and_all_complete(comfy, tmp_path):
    bodies = [{**SMALL, "seed": i, "fps": 8 + i, "frames": 7 + 6 * i} for i in range(3)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(comfy, b, query="?sync=1", timeout=300), bodies))
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["X-Seed"] == str(body["seed"])
        check_mp4(r.content, tmp_path, frames=body["frames"], fps=body["fps"])
    assert len({r.headers["X-Job-Id"] for r in answers}) == len(bodies)


def test_400_names_every_bad_field_and_its_range(comfy):
    r = post(comfy, {"prompt": "", "negative_prompt": 3, "guidance_scale": 10.5, "fps": 6,
                     "frames": 161, "steps": 9.5, "seed": -1, "dit_name": "../x.safetensors"},
             query="?timeout=0")
    assert r.status_code == 400
    fields = r.json()["fields"]
    assert set(fields) == {"prompt", "negative_prompt", "guidance_scale", "fps", "frames",
                           "steps", "seed", "dit_name", "timeout"}
    assert fields["guidance_scale"]["allowed"] == {"type": "number", "min": 2, "max": 10}
    assert fields["fps"]["allowed"] == {"type": "integer", "min": 7, "max": 30}
    assert fields["frames"]["allowed"] == {"type": "integer", "min": 1, "max": 160}
    assert fields["steps"]["allowed"] == {"type": "integer", "min": 10, "max": 75}
    assert fields["seed"]["allowed"] == {"type": "integer", "min": 0, "max": 2**32 - 1}
    assert "unknown field" in fields["dit_name"]["message"]
    assert post(comfy, {"frames": 7}).json()["fields"].keys() == {"prompt"}
    assert post(comfy, ["a list"]).json()["fields"].keys() == {"body"}
    raw = requests.post(f"{comfy.url}{API}/generate", data=b"{not json",
                        headers={"x-api-key": API_KEY}, timeout=30)
    assert raw.status_code == 400 and "body" in raw.json()["fields"]
    # Boundaries are inside the ranges (checked without running: the timeout is bad).
    edges = {"prompt": "x", "guidance_scale": 2, "fps": 30, "frames": 1, "steps": 75, "seed": 0}
    assert post(comfy, edges, query="?sync=1&timeout=0.5").json()["fields"].keys() == {"timeout"}


@pytest.mark.parametrize("key", [None, "", "wrong", API_KEY[:-1], API_KEY + "x"])
def test_401_without_the_right_key(comfy, key):
    assert post(comfy, SMALL, key=key).status_code == 401
    assert get(comfy, f"/jobs/{uuid.uuid4().hex}", key=key).status_code == 401


def test_404_for_unknown_jobs_and_other_clients_prompts(comfy):
    for path in (f"/jobs/{uuid.uuid4().hex}", f"/jobs/{uuid.uuid4().hex}/video"):
        r = get(comfy, path)
        assert r.status_code == 404 and r.json()["error"] == "unknown job"
    image = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                     "color": 0}}
    preview = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    status, body = comfy.queue({"1": image, "2": preview})
    assert status == 200, body
    assert comfy.wait(body["prompt_id"])["status"]["status_str"] == "success"
    assert get(comfy, f"/jobs/{body['prompt_id']}").status_code == 404


def test_413_for_an_oversized_body(comfy):
    r = post(comfy, {"prompt": "x" * (64 * 1024)})
    assert r.status_code == 413
    chunked = requests.post(f"{comfy.url}{API}/generate", timeout=30,
                            data=iter([b'{"prompt": "', b"x" * (70 * 1024), b'"}']),
                            headers={"x-api-key": API_KEY, "Content-Type": "application/json"})
    assert chunked.status_code == 413


def test_429_over_the_queue_depth_and_504_past_the_sync_deadline(comfy, tmp_path):
    """Four jobs fill the queue (limit 4, each takes seconds): the fifth is refused. A sync call
    behind two jobs with a 1 s deadline gets 504 and its job goes on to finish."""
    accepted = [post(comfy, {**SMALL, "seed": i}) for i in range(MAX_QUEUE)]
    refused = post(comfy, SMALL)
    assert [r.status_code for r in accepted] == [202] * MAX_QUEUE, [r.text for r in accepted]
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert f"limit {MAX_QUEUE}" in refused.json()["error"]
    while len(comfy.get("/queue")["queue_pending"]) > 2:  # the first job done: room for one
        time.sleep(0.1)
    late = post(comfy, {**SMALL, "seed": 99}, query="?sync=true&timeout=1")
    assert late.status_code == 504, late.text
    assert late.json()["status"] in ("queued", "running")
    for r in [*accepted, late]:
        assert wait_done(comfy, r.json()["id"])["status"] == "succeeded"
    video = get(comfy, f"/jobs/{late.json()['id']}/video")
    check_mp4(video.content, tmp_path, frames=7, fps=16)


@pytest.fixture(scope="module")
def keyless(tmp_path_factory):
    """A second server started without any API key (nor models: no run reaches a model)."""
    base = tmp_path_factory.mktemp("keyless")
    seed_base(base)
    server = start_server(base, env={"MOCHI_API_KEY": ""})
    yield server
    stop_server(server)


def test_routes_are_off_without_a_key_and_the_settings_file_turns_them_on(keyless):
    for key in (None, API_KEY, ""):
        assert post(keyless, SMALL, key=key).status_code == 404
        assert get(keyless, f"/jobs/{uuid.uuid4().hex}", key=key).status_code == 404
    settings = keyless.base / "user" / "__mochi_api" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"api_key": "from-the-file", "width": 64, "height": 48}))
    assert post(keyless, SMALL, key=API_KEY).status_code == 401
    assert post(keyless, {"frames": 7}, key="from-the-file").status_code == 400
    # No model in this server: the bundled workflow's files are refused before anything runs.
    r = post(keyless, SMALL, key="from-the-file")
    assert r.status_code == 500 and "mochi_preview_bf16.safetensors" in r.json()["error"]
    settings.unlink()
    assert post(keyless, SMALL, key="from-the-file").status_code == 404


def test_500_with_the_message_of_a_failed_run(keyless):
    """Configured model files that exist but are not checkpoints: the run fails in a loader."""
    for folder, name in (("diffusion_models", "dit"), ("vae", "vae"), ("text_encoders", "t5")):
        (keyless.base / "models" / folder / f"broken_{name}.safetensors").write_bytes(b"\0" * 64)
    settings = keyless.base / "user" / "__mochi_api" / "settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({
        "api_key": "k", "width": 64, "height": 48, "dit": "broken_dit.safetensors",
        "vae": "broken_vae.safetensors", "t5": "broken_t5.safetensors"}))
    sync = post(keyless, SMALL, key="k", query="?sync=true")
    assert sync.status_code == 500
    assert "broken_" in sync.json()["error"] and "Loader" in sync.json()["error"]
    job = post(keyless, SMALL, key="k").json()
    deadline = time.monotonic() + 60
    while (status := get(keyless, f"/jobs/{job['id']}", key="k").json())["status"] in (
            "queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status["status"] == "failed" and "broken_" in status["error"]
    video = get(keyless, f"/jobs/{job['id']}/video", key="k")
    assert video.status_code == 500 and video.json()["error"] == status["error"]
