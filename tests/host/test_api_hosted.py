"""The hosted Mochi API's own route, ``POST /v1/mochi-1``, against the real server.

A client written for the hosted API (``requests.post(url, headers=..., json=data)``, then
``response.status_code == 200`` and the body written to a file) runs with only its base URL
changed: the server is given the key the client already sends. Every status code the hosted API
documents (400, 401, 403, 404, 429, 500, 502, 504) is provoked here. The server of this module
loads ``tests/host/api_hold`` (a job held in its first step, released by the test) and keeps its
model files in the API's settings file, so that a test can name broken or missing ones.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from mochi_api.request import snap_frames
from mochi_api.settings import FULL, READ, SettingsError, load
from scripts.comfy_server import fill_demo_models, seed_base, start_server, stop_server
from tests.host.harness import API_SETTINGS
from tests.host.media import decode_frames, read_video
from tests.host.test_api import MAX_QUEUE, SMALL, Hold, check_mp4, strict_json

pytestmark = pytest.mark.host

HOSTED_BASE = "https://api.segmind.com"
ROUTE = "/v1/mochi-1"
#: The key the hosted client already holds; the server is configured with it.
CLIENT_KEY = "YOUR_API_KEY"
READ_KEY = "read-only-key"

#: A client written for the hosted API, as its users have it (the request the hosted API's
#: documentation shows, the video written to a file on 200).
CLIENT = f'''
import requests

url = "{HOSTED_BASE}{ROUTE}"
headers = {{"x-api-key": "{CLIENT_KEY}", "Content-Type": "application/json"}}
data = {{
    "prompt": "A fluffy creature with big round eyes sits in a human hand, in a soft forest",
    "negative_prompt": "blurry, low quality",
    "guidance_scale": 4.5,
    "fps": 16,
    "steps": 30,
    "seed": 985521,
    "frames": 52,
}}

response = requests.post(url, headers=headers, json=data)
if response.status_code == 200:
    with open("mochi_video.mp4", "wb") as f:
        f.write(response.content)
    print("Saved mochi_video.mp4")
else:
    print(f"Error: {{response.status_code}}")
    print(response.text)
'''


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A server with the client's key, a read-only key, the demo weights (named in the settings
    file) and the ``api_hold`` test extension."""
    base = tmp_path_factory.mktemp("hosted")
    seed_base(base)
    os.symlink(Path(__file__).resolve().parent / "api_hold", base / "custom_nodes" / "api_hold")
    server = start_server(base, env={**API_SETTINGS, "MOCHI_API_KEY": CLIENT_KEY,
                                     "MOCHI_API_READ_KEY": READ_KEY})
    server.demo_files = fill_demo_models(base / "models")
    server.settings = base / "user" / "__mochi_api" / "settings.json"
    server.settings.parent.mkdir(parents=True, exist_ok=True)
    _write_models(server, server.demo_files)
    yield server
    stop_server(server)


def _write_models(server, files: dict[str, str]) -> None:
    server.settings.write_text(json.dumps({name: files[name] for name in ("dit", "vae", "t5")}))


@contextlib.contextmanager
def models(server, **files: str):
    """The API runs with these model files (names in the model folders) inside the block."""
    _write_models(server, {**server.demo_files, **files})
    try:
        yield
    finally:
        _write_models(server, server.demo_files)


def call(server, body, key: str | None = CLIENT_KEY, path: str = ROUTE, **kwargs):
    headers = {} if key is None else {"x-api-key": key}
    return requests.post(f"{server.url}{path}", json=body, headers=headers,
                         timeout=kwargs.pop("timeout", 300), **kwargs)


def read(server, path: str, key: str = CLIENT_KEY):
    return requests.get(f"{server.url}/mochi/v1{path}", headers={"x-api-key": key}, timeout=30)


def wait_done(server, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while (status := read(server, f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.25)
    return status


def test_a_hosted_api_client_runs_with_only_the_base_url_changed(hosted, tmp_path):
    """The client's text with the hosted base URL replaced, and nothing else, run as a program:
    it writes a playable MP4 with the frame count and fps the server reports for the job."""
    script = CLIENT.replace(HOSTED_BASE, hosted.url)
    changed = [line for line in difflib.ndiff(CLIENT.splitlines(), script.splitlines())
               if line.startswith(("+ ", "- "))]
    assert changed == [f'- url = "{HOSTED_BASE}{ROUTE}"', f'+ url = "{hosted.url}{ROUTE}"']
    before = set((hosted.output_dir / "mochi_api").glob("*.mp4"))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0 and done.stdout == "Saved mochi_video.mp4\n", done
    (written,) = set((hosted.output_dir / "mochi_api").glob("*.mp4")) - before
    job = read(hosted, f"/jobs/{written.name.split('_')[0]}").json()
    assert job["status"] == "succeeded" and job["requested_frames"] == 52, job
    assert (job["frames"], job["fps"]) == (snap_frames(52), 16) == (49, 16)
    video = tmp_path / "mochi_video.mp4"
    assert video.read_bytes() == written.read_bytes()
    info = read_video(video)
    assert (info.frames, info.fps) == (job["frames"], job["fps"])
    assert (info.width, info.height) == (job["width"], job["height"])
    assert decode_frames(video).shape == (job["frames"], job["height"], job["width"], 3)


def test_200_is_the_mp4_under_both_prefixes(hosted, tmp_path):
    for prefix in ("", "/api"):
        r = call(hosted, {**SMALL, "fps": 12, "seed": 3}, path=prefix + ROUTE)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"] == "video/mp4"
        assert (r.headers["X-Frames"], r.headers["X-Fps"], r.headers["X-Seed"]) == (
            "7", "12", "3")
        check_mp4(r.content, tmp_path, frames=7, fps=12)
        assert read(hosted, f"/jobs/{r.headers['X-Job-Id']}").json()["status"] == "succeeded"


def test_400_names_each_bad_field(hosted):
    r = call(hosted, {"prompt": "", "guidance_scale": 1, "fps": 31, "frames": 0, "steps": 76,
                      "seed": -1, "model": "x.safetensors"})
    assert r.status_code == 400, r.text
    fields = strict_json(r)["fields"]
    assert set(fields) == {"prompt", "guidance_scale", "fps", "frames", "steps", "seed", "model"}
    assert fields["fps"]["allowed"] == {"type": "integer", "min": 7, "max": 30}
    # The hosted route is always synchronous: ``sync`` is not one of its parameters.
    r = call(hosted, {"frames": 7}, path=ROUTE + "?sync=false&timeout=0")
    assert r.status_code == 400 and strict_json(r)["fields"].keys() == {
        "prompt", "sync", "timeout"}, r.text
    # What /mochi/v1 answers with 413 and 415 is a bad parameter here (400), named too.
    big = call(hosted, {"prompt": "x" * (64 * 1024)})
    assert big.status_code == 400 and strict_json(big)["fields"].keys() == {"body"}, big.text
    plain = requests.post(f"{hosted.url}{ROUTE}", data=json.dumps(SMALL), timeout=30,
                          headers={"x-api-key": CLIENT_KEY, "Content-Type": "text/plain"})
    assert plain.status_code == 400, plain.text
    assert strict_json(plain)["fields"].keys() == {"Content-Type"}


@pytest.mark.parametrize("key", [None, "", "wrong", CLIENT_KEY + "x", CLIENT_KEY.lower()])
def test_401_for_a_missing_or_wrong_key(hosted, key):
    r = call(hosted, SMALL, key=key)
    assert r.status_code == 401 and "x-api-key" in strict_json(r)["error"], r.text


def test_403_for_the_read_only_key_which_reads_jobs(hosted):
    """The read-only key is valid (it reads a job and its video) but may not generate."""
    made = call(hosted, SMALL)
    assert made.status_code == 200, made.text
    job_id = made.headers["X-Job-Id"]
    assert read(hosted, f"/jobs/{job_id}", key=READ_KEY).json()["status"] == "succeeded"
    assert read(hosted, f"/jobs/{job_id}/video", key=READ_KEY).content == made.content
    for path in (ROUTE, "/api" + ROUTE, "/mochi/v1/generate"):
        r = call(hosted, SMALL, key=READ_KEY, path=path)
        assert r.status_code == 403 and "only read" in strict_json(r)["error"], (path, r.text)


def test_404_for_an_unknown_route_or_job(hosted):
    """The host alone answers a POST to an unknown path with 405 (its static files take every
    path); under ``/v1/mochi`` the answer is the hosted API's 404, naming the routes."""
    for path in ("/v1/mochi-2", "/v1/mochi-1/generate", "/api/v1/mochi", "/v1/mochi-1/"):
        r = call(hosted, SMALL, path=path)
        assert r.status_code == 404 and f"POST {ROUTE}" in strict_json(r)["routes"], (path, r)
    assert requests.get(f"{hosted.url}/v1/mochi-1", timeout=30).status_code == 405
    r = read(hosted, "/jobs/0123456789abcdef0123456789abcdef")
    assert r.status_code == 404 and strict_json(r)["error"] == "unknown job"


def test_429_when_the_queue_is_full_and_504_past_the_deadline(hosted, tmp_path):
    """A hosted call is held in its first step; one behind it with a 1 s deadline gets 504 (its
    job goes on and is fetched later); the queue filled to its limit, the next call gets 429
    with Retry-After. Released, the held call gets its MP4."""
    with Hold(hosted) as hold, ThreadPoolExecutor(1) as pool:
        first = pool.submit(call, hosted, {**SMALL, "seed": 0})
        hold.wait_held()
        late = call(hosted, {**SMALL, "seed": 1}, path=ROUTE + "?timeout=1")
        assert late.status_code == 504, late.text
        job = strict_json(late)
        assert job["status"] == "queued" and job["status_url"] == f"/mochi/v1/jobs/{job['id']}"
        fill = [call(hosted, {**SMALL, "seed": s}, path="/mochi/v1/generate") for s in (2, 3)]
        assert [r.status_code for r in fill] == [202, 202] and MAX_QUEUE == 4
        full = call(hosted, SMALL)
        assert full.status_code == 429 and int(full.headers["Retry-After"]) > 0, full.text
        hold.release()
        assert first.result().status_code == 200
    assert wait_done(hosted, job["id"])["status"] == "succeeded"
    check_mp4(read(hosted, f"/jobs/{job['id']}/video").content, tmp_path, frames=7, fps=16)
    for r in fill:
        assert wait_done(hosted, r.json()["id"])["status"] == "succeeded"


def test_500_with_the_message_of_a_failed_run(hosted):
    """Model files that exist but are not checkpoints: the run fails in a loader."""
    for folder, name in (("diffusion_models", "dit"), ("vae", "vae"), ("text_encoders", "t5")):
        (hosted.base / "models" / folder / f"broken_{name}.safetensors").write_bytes(b"\0" * 64)
    broken = {name: f"broken_{name}.safetensors" for name in ("dit", "vae", "t5")}
    with models(hosted, **broken):
        r = call(hosted, SMALL)
    assert r.status_code == 500, r.text
    assert "broken_" in strict_json(r)["error"] and "Loader" in r.json()["error"]


def test_502_when_the_host_refuses_the_graph_or_cancels_the_run(hosted):
    """The host gives no video without the run failing: a configured model file it cannot find
    (``/mochi/v1/generate`` keeps its 500), or a run interrupted from the host's UI."""
    with models(hosted, dit="missing_dit.safetensors"):
        r = call(hosted, SMALL)
        own = call(hosted, SMALL, path="/mochi/v1/generate")
    assert r.status_code == 502 and "missing_dit.safetensors" in strict_json(r)["error"], r.text
    assert own.status_code == 500 and "missing_dit.safetensors" in own.json()["error"]
    with Hold(hosted) as hold, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call, hosted, SMALL)
        hold.wait_held()
        assert hosted.request("/interrupt", {})[0] == 200
        hold.release()
        r = answer.result()
    assert r.status_code == 502 and strict_json(r)["status"] == "cancelled", r.text
    assert read(hosted, f"/jobs/{r.json()['id']}/video").status_code == 410


def test_the_read_only_key_in_the_settings(tmp_path):
    """Which key is which; a read-only key alone does not turn the routes on, and one equal to
    the API key is refused (it would be both)."""
    missing = tmp_path / "settings.json"
    settings = load(missing, {"MOCHI_API_KEY": "full", "MOCHI_API_READ_KEY": "read"})
    assert [settings.key_role(k) for k in ("full", "read", "Read", "", None)] == [
        FULL, READ, None, None, None]
    assert load(missing, {"MOCHI_API_KEY": "full"}).key_role("read") is None
    assert load(missing, {"MOCHI_API_READ_KEY": "read"}) is None
    with pytest.raises(SettingsError, match="read_key"):
        load(missing, {"MOCHI_API_KEY": "same", "MOCHI_API_READ_KEY": "same"})
    missing.write_text(json.dumps({"api_key": "full", "read_key": "r\udcff"}))
    assert load(missing, {}).key_role("r\udcff") == READ  # a byte that is not UTF-8, as sent
