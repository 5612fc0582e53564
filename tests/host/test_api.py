"""The generation HTTP API (``/mochi/v1``) against the real server, with real HTTP clients.

The session server runs with the API on (``harness.API_SETTINGS``: a key, 64×48, queue limit 4);
a second server, without a key, checks that the routes are off and that the settings file turns
them on; a third one (``held``) also loads ``tests/host/api_hold``, which holds an API job inside
its first progress report until the test releases it, so that tests about the ``queued`` and
``running`` states, the queue limit, the sync deadline and interrupts do not depend on how fast
the machine runs. Runs use 10 steps (the API's minimum) at 64×48 on the demo weights.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from mochi_api.request import snap_frames
from scripts.comfy_server import fill_demo_models, seed_base, start_server, stop_server
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


def strict_json(r) -> dict:
    """The answer's JSON body, parsed as strict JSON (no NaN/Infinity, which Python would take)."""
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    return json.loads(r.content.decode("utf-8"), parse_constant=_refuse_constant)


def _refuse_constant(name: str):
    raise AssertionError(f"the answer holds {name}, which is not JSON")


# -- A server whose API jobs can be held (tests/host/api_hold) ----------------------------------

@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A server with the API on, the demo weights and the ``api_hold`` test extension."""
    base = tmp_path_factory.mktemp("held")
    seed_base(base)
    os.symlink(Path(__file__).resolve().parent / "api_hold", base / "custom_nodes" / "api_hold")
    names = fill_demo_models(base / "models")
    models = {"MOCHI_API_DIT": names["dit"], "MOCHI_API_VAE": names["vae"],
              "MOCHI_API_T5": names["t5"]}
    server = start_server(base, env={**API_SETTINGS, **models})
    yield server
    stop_server(server)


class Hold:
    """``with Hold(server) as hold:`` the next API job stops in its first progress report (it is
    then ``running``) until ``hold.release()`` or the end of the block."""

    def __init__(self, server) -> None:
        self.server = server

    def __enter__(self) -> Hold:
        assert self.server.request("/api_hold/arm", {})[0] == 200
        return self

    def wait_held(self) -> None:
        """Returns once a job is held (the server answers when it is)."""
        status, body = self.server.request("/api_hold/held", timeout=150)
        assert status == 200 and body["held"], body

    def release(self) -> None:
        assert self.server.request("/api_hold/release", {})[0] == 200

    def __exit__(self, *exc) -> None:
        self.release()


# -- Requests written by hand: bodies in chunks, bytes no client library sends --------------------

class RawRequest:
    """One HTTP/1.1 request on a socket of its own (``Connection: close``)."""

    def __init__(self, server, path: str, headers: list[tuple[bytes, bytes]],
                 method: bytes = b"POST") -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        self.buffer = b""
        lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1",
                 b"Connection: close", *(name + b": " + value for name, value in headers)]
        self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")

    def expect_continue(self) -> None:
        """Wait for ``100 Continue``: the server has routed the request and will read its body."""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 100"), head

    def answered(self) -> bool:
        """Whether the server has already sent (part of) an answer. A server that waits for the
        rest of the body sends none, so this holds whatever the wait; the wait only gives a
        server that answers too early the time to show it."""
        return bool(self.buffer) or bool(select.select([self.sock], [], [], 0.3)[0])

    def chunk(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n" % len(data) + data + b"\r\n")

    def answer(self) -> tuple[int, dict]:
        """The status and JSON body of the answer."""
        status, body = self.raw_answer()
        return status, json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)

    def raw_answer(self) -> tuple[int, bytes]:
        """The status and body bytes of the answer (read to the end of the connection)."""
        while data := self._recv():
            self.buffer += data
        self.sock.close()
        head, body = self.buffer.split(b"\r\n\r\n", 1)
        return int(head.split(b" ", 2)[1]), body

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""


def chunked(server, parts: list[bytes], probe: bool = True,
            query: str = "") -> tuple[int, dict]:
    """POST a body in ``parts`` as separate chunks; with ``probe``, no answer may come before
    the last one."""
    raw = RawRequest(server, f"{API}/generate{query}", [
        (b"x-api-key", API_KEY.encode()), (b"Content-Type", b"application/json"),
        (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue")])
    raw.expect_continue()
    for part in parts:
        raw.chunk(part)
        if probe:
            assert not raw.answered(), "the server answered before the whole body was sent"
    raw.sock.sendall(b"0\r\n\r\n")
    return raw.answer()


@pytest.mark.parametrize("frames", range(1, 161))
def test_frames_snap_to_the_nearest_6k_plus_1(frames):
    valid = range(7, 161, 6)
    nearest = min(valid, key=lambda n: (abs(n - frames), n))  # ties go to the lower count
    assert snap_frames(frames) == nearest


def test_async_job_polls_and_returns_a_playable_mp4(held, tmp_path):
    """The job is held in its first step while its state and early video are read."""
    with Hold(held) as hold:
        r = post(held, {**SMALL, "frames": 14, "fps": 12, "seed": 7, "guidance_scale": 6,
                        "negative_prompt": "blurry"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert (job["frames"], job["requested_frames"], job["fps"], job["seed"]) == (13, 14, 12, 7)
        assert (job["width"], job["height"], job["steps"]) == (WIDTH, HEIGHT, 10)
        assert job["status"] in ("queued", "running")
        hold.wait_held()
        assert get(held, f"/jobs/{job['id']}").json()["status"] == "running"
        early = get(held, f"/jobs/{job['id']}/video")
        assert early.status_code == 409 and early.json()["status"] == "running"
    done = wait_done(held, job["id"])
    assert done["status"] == "succeeded", done
    video = get(held, f"/jobs/{job['id']}/video")
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


def test_429_over_the_queue_depth_and_504_past_the_sync_deadline(held, tmp_path):
    """The first job is held in its first step: a sync call behind it with a 1 s deadline gets
    504 (its job cannot have run) and its job goes on; jobs up to the limit (4, running and
    pending) are accepted and the next is refused. Released, every job finishes."""
    with Hold(held) as hold:
        first = post(held, {**SMALL, "seed": 0})
        assert first.status_code == 202, first.text
        hold.wait_held()
        late = post(held, {**SMALL, "seed": 99}, query="?sync=true&timeout=1")
        assert late.status_code == 504, late.text
        assert late.json()["status"] == "queued"
        accepted = [post(held, {**SMALL, "seed": i}) for i in range(1, MAX_QUEUE - 1)]
        assert [r.status_code for r in accepted] == [202] * (MAX_QUEUE - 2), [
            r.text for r in accepted]
        refused = post(held, SMALL)
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        assert f"limit {MAX_QUEUE}" in refused.json()["error"]
        assert get(held, f"/jobs/{first.json()['id']}").json()["status"] == "running"
    for r in [first, *accepted, late]:
        assert wait_done(held, r.json()["id"])["status"] == "succeeded"
    video = get(held, f"/jobs/{late.json()['id']}/video")
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


# -- Bodies: read to their end, any JSON the parser cannot take is a 400 naming the problem ------

def test_a_body_sent_in_chunks_is_read_to_its_end(comfy):
    """A chunked body arrives in several pieces; the server waits for all of them: the last one
    holds a bad ``fps``, which must be the only field named, and a good body is accepted."""
    parts = [b'{"prompt": "a red', b' fox", "frames": 7, ', b'"steps": 10, "fps": 6}']
    status, body = chunked(comfy, parts)
    assert status == 400 and body["fields"].keys() == {"fps"}, body
    status, job = chunked(comfy, [b'{"prompt": "a red', b' fox", "frames": 7, ', b'"steps": 10}'])
    assert status == 202, job
    assert wait_done(comfy, job["id"])["status"] == "succeeded"
    # Through a client library too: a generator body is sent chunked, in pieces.
    r = requests.post(f"{comfy.url}{API}/generate?timeout=0", timeout=30,
                      data=iter([b'{"prompt": ', b'"x", ', b'"frames": 7}']),
                      headers={"x-api-key": API_KEY, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["fields"].keys() == {"timeout"}, r.text


def test_413_for_an_oversized_chunked_body(comfy):
    """Over the limit in chunks of 8 KiB (no Content-Length): 413 once the limit is passed."""
    first = b'{"prompt": "' + b"x" * 8180
    parts = [first] + [b"x" * 8192] * 8 + [b'"}']
    status, body = chunked(comfy, parts[:1])  # one small piece: read whole, not over
    assert status == 400 and body["fields"].keys() == {"body"}, body
    status, body = chunked(comfy, parts, probe=False)
    assert status == 413 and "65536" in body["error"], body


DEEP = 30_000
BAD_BODIES = {
    "empty": b"",
    "not json": b"{not json",
    "a list": b'["prompt"]',
    "a string": b'"prompt"',
    "null": b"null",
    "nesting bomb": b"[" * 60_000,
    "nested prompt": b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "invalid utf-8": b'{"prompt": "\xff\xfe"}',
    "utf-8 encoded surrogate": b'{"prompt": "\xed\xa0\x80"}',
    "utf-16": '{"frames": 7}'.encode("utf-16"),
    "trailing data": b'{"prompt": "x"} {}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_any_body_the_parser_cannot_take_is_a_400(comfy, body):
    r = requests.post(f"{comfy.url}{API}/generate", data=body, timeout=30,
                      headers={"x-api-key": API_KEY, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    answer = strict_json(r)
    assert answer["error"] == "invalid request" and answer["fields"].keys() == {"body"}, answer
    assert answer["fields"]["body"]["message"].startswith("the body "), answer


BIG = "1" + "0" * 400  # 10**400: no float holds it
BAD_NUMBERS = {
    "NaN": ("guidance_scale", "NaN"),
    "Infinity": ("guidance_scale", "Infinity"),
    "-Infinity": ("fps", "-Infinity"),
    "1e999": ("guidance_scale", "1e999"),
    "-1e999": ("steps", "-1e999"),
    "10**400 seed": ("seed", BIG),
    "10**400 frames": ("frames", BIG),
    "10**400 guidance": ("guidance_scale", BIG),
    "-10**400 fps": ("fps", "-" + BIG),
    "5000 digits": ("seed", "9" * 5000),
    "1e400 integer": ("steps", "1e400"),
}


@pytest.mark.parametrize(("name", "literal"), BAD_NUMBERS.values(), ids=BAD_NUMBERS.keys())
def test_numbers_no_float_holds_are_a_400_naming_the_field(comfy, name, literal):
    body = b'{"prompt": "x", "%s": %s}' % (name.encode(), literal.encode())
    r = requests.post(f"{comfy.url}{API}/generate", data=body, timeout=30,
                      headers={"x-api-key": API_KEY, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    fields = strict_json(r)["fields"]
    assert fields.keys() == {name}, fields
    assert fields[name]["allowed"]["min"] <= fields[name]["allowed"]["max"]


def test_a_repeated_field_is_a_400_naming_it(comfy):
    body = b'{"prompt": "a fox", "frames": 7, "prompt": "a cat"}'
    r = requests.post(f"{comfy.url}{API}/generate", data=body, timeout=30,
                      headers={"x-api-key": API_KEY, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    fields = strict_json(r)["fields"]
    assert fields.keys() == {"prompt"} and "more than once" in fields["prompt"]["message"]


BAD_TEXT = {
    "too long": ("prompt", "x" * 20_001, "20,000"),
    "too long negative": ("negative_prompt", "x" * 20_001, "20,000"),
    "lone surrogate": ("prompt", "a fox \ud800", "surrogate"),
    "lone surrogate negative": ("negative_prompt", "\udfff", "surrogate"),
    "NUL only": ("prompt", "\x00", "NUL"),
    "NUL in negative": ("negative_prompt", "blurry\x00", "NUL"),
    "zero-width only": ("prompt", "\u200b\u200b", "visible"),
    "format characters only": ("prompt", "\ufeff\u2060\u200d", "visible"),
    "whitespace only": ("prompt", " \t\n\u3000", "visible"),
    "control characters only": ("prompt", "\x01\x1f\x7f", "visible"),
    "Hangul filler only": ("prompt", "\u3164\u3164", "visible"),
    "blank braille and a variation selector": ("prompt", "\u2800\ufe0f", "visible"),
    "not text": ("prompt", ["a fox"], "string"),
}


@pytest.mark.parametrize(("name", "value", "says"), BAD_TEXT.values(), ids=BAD_TEXT.keys())
def test_prompts_follow_the_cores_rule(comfy, name, value, says):
    """400 naming the field before anything is queued, with the core's message."""
    r = post(comfy, {**SMALL, name: value})
    assert r.status_code == 400, r.text
    fields = strict_json(r)["fields"]
    assert fields.keys() == {name}, fields
    assert says in fields[name]["message"] and name in fields[name]["message"], fields
    assert fields[name]["allowed"]["type"] == "string"


ODD_BUT_VALID = {
    "longest prompt": {"prompt": "x" * 20_000},
    "visible and zero-width": {"prompt": "a\u200bfox"},
    "non-ASCII": {"prompt": "雪の中の狐 🦊", "negative_prompt": "flou, 模糊"},
    "control characters with text": {"prompt": "a\tred\x01fox"},
    "empty negative": {"prompt": "x", "negative_prompt": ""},
    "blank negative": {"prompt": "x", "negative_prompt": " \u200b"},
    "null negative": {"prompt": "x", "negative_prompt": None},
    "longest negative": {"prompt": "x", "negative_prompt": "y" * 20_000},
}


@pytest.mark.parametrize("body", ODD_BUT_VALID.values(), ids=ODD_BUT_VALID.keys())
def test_odd_but_valid_text_passes_the_body_rules(comfy, body):
    """Checked without running: the query's timeout is bad, so it is the only field named."""
    r = post(comfy, body, query="?sync=true&timeout=0")
    assert r.status_code == 400 and r.json()["fields"].keys() == {"timeout"}, r.text


# -- Headers: the key, the media type --------------------------------------------------------

BAD_KEYS = {
    "latin-1 bytes": b"\xff\xfe\xe9",
    "right key then a byte": API_KEY.encode() + b"\xe9",
    "a lone continuation byte": b"\x80",
    "overlong slash": b"\xc0\xaf",
}


@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_401_for_a_key_of_any_bytes(comfy, key):
    for method, path in ((b"POST", f"{API}/generate"), (b"GET", f"{API}/jobs/{uuid.uuid4().hex}"),
                         (b"GET", f"{API}/jobs/{uuid.uuid4().hex}/video")):
        raw = RawRequest(comfy, path, [(b"x-api-key", key), (b"Content-Length", b"0")], method)
        status, body = raw.answer()
        assert status == 401 and "x-api-key" in body["error"], (path, body)


def test_401_for_two_keys(comfy):
    """Two ``x-api-key`` headers are refused even when one holds the right key."""
    for keys in ((API_KEY, "wrong"), ("wrong", API_KEY), (API_KEY, API_KEY)):
        raw = RawRequest(comfy, f"{API}/jobs/{uuid.uuid4().hex}",
                         [(b"x-api-key", k.encode()) for k in keys], b"GET")
        status, body = raw.answer()
        assert status == 401, (keys, body)


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/jsonx", "json", "application/json; charset=latin-1", "application/xml", ""])
def test_415_for_a_body_that_is_not_json_by_its_content_type(comfy, content_type):
    r = requests.post(f"{comfy.url}{API}/generate", data=json.dumps(SMALL), timeout=30,
                      headers={"x-api-key": API_KEY, "Content-Type": content_type})
    assert r.status_code == 415, r.text
    field = strict_json(r)["fields"]["Content-Type"]
    assert field["allowed"] == {"values": ["application/json"]} and field["got"] == content_type


@pytest.mark.parametrize("content_type", [
    "application/json", "Application/JSON", "application/json; charset=utf-8",
    'application/json;charset="UTF-8"', None])
def test_json_content_types_and_none_are_read_as_json(comfy, content_type):
    """Checked without running: the body lacks ``prompt``. No Content-Type at all (what
    ``requests`` sends for ``data=bytes``) is read as JSON."""
    headers = {"x-api-key": API_KEY} | ({} if content_type is None else {
        "Content-Type": content_type})
    r = requests.post(f"{comfy.url}{API}/generate", data=b'{"frames": 7}', headers=headers,
                      timeout=30)
    assert r.status_code == 400 and r.json()["fields"].keys() == {"prompt"}, r.text


def test_two_content_types_are_refused(comfy):
    """aiohttp itself refuses a repeated Content-Type (400) before the route runs; the route
    would answer 415 (it reads every Content-Type header)."""
    raw = RawRequest(comfy, f"{API}/generate", [
        (b"x-api-key", API_KEY.encode()), (b"Content-Type", b"application/json"),
        (b"Content-Type", b"text/plain"), (b"Content-Length", b"15")])
    raw.sock.sendall(b'{"prompt": "x"}')
    status, body = raw.raw_answer()
    assert status in (400, 415), body


# -- Query parameters --------------------------------------------------------------------------

BAD_QUERIES = {
    "sync=maybe": ("?sync=maybe", "sync"),
    "sync twice": ("?sync=true&sync=false", "sync"),
    "sync empty": ("?sync=", "sync"),
    "timeout=abc": ("?sync=1&timeout=abc", "timeout"),
    "timeout=nan": ("?sync=1&timeout=nan", "timeout"),
    "timeout=inf": ("?sync=1&timeout=inf", "timeout"),
    "timeout=1e999": ("?sync=1&timeout=1e999", "timeout"),
    "timeout=1_0": ("?sync=1&timeout=1_0", "timeout"),
    "timeout twice": ("?sync=1&timeout=5&timeout=6", "timeout"),
    "timeout past the server's": ("?sync=1&timeout=301", "timeout"),
    "timeout bad bytes": ("?sync=1&timeout=%ff", "timeout"),
    "unknown": ("?model=a.safetensors", "model"),
}


@pytest.mark.parametrize(("query", "name"), BAD_QUERIES.values(), ids=BAD_QUERIES.keys())
def test_query_parameters_are_validated(comfy, query, name):
    """400 naming the parameter, with the body's own problem (no prompt) named next to it."""
    r = post(comfy, {"frames": 7}, query=query)
    assert r.status_code == 400, r.text
    fields = strict_json(r)["fields"]
    assert fields.keys() == {"prompt", name}, fields
    assert "allowed" in fields[name] and "query" in fields[name]["message"], fields


def test_query_parameters_of_the_job_routes_are_validated(comfy):
    for path in (f"/jobs/{uuid.uuid4().hex}?x=1", f"/jobs/{uuid.uuid4().hex}/video?sync=1"):
        r = get(comfy, path)
        assert r.status_code == 400 and len(strict_json(r)["fields"]) == 1, r.text
    assert post(comfy, {"frames": 7}, query="?sync=FALSE&timeout=2.5").json()[
        "fields"].keys() == {"prompt"}


# -- Job states: an interrupted or removed job is cancelled, its video gone (410) ---------------

def test_an_interrupted_job_is_cancelled_and_its_video_is_gone(held):
    """Held in its first step, the job is interrupted through the host's ``POST /interrupt``;
    the async job reads ``cancelled`` and its video answers 410, as does a sync call's."""
    for sync in (False, True):
        with Hold(held) as hold, ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post, held, SMALL, query="?sync=true" if sync else "")
            hold.wait_held()
            assert held.request("/interrupt", {})[0] == 200
            hold.release()
            r = answer.result()
        if sync:
            assert r.status_code == 410, r.text
            assert strict_json(r)["status"] == "cancelled"
            job_id = r.json()["id"]
        else:
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
        status = wait_done(held, job_id)
        assert status["status"] == "cancelled" and "interrupted" in status["error"], status
        video = get(held, f"/jobs/{job_id}/video")
        assert video.status_code == 410, video.text
        assert strict_json(video)["status"] == "cancelled" and "cancelled" in video.json()["error"]


def test_a_job_deleted_from_the_queue_is_cancelled(held, tmp_path):
    with Hold(held) as hold:
        first = post(held, SMALL).json()
        hold.wait_held()
        second = post(held, {**SMALL, "seed": 5}).json()
        assert get(held, f"/jobs/{second['id']}").json()["status"] == "queued"
        assert held.request("/queue", {"delete": [second["id"]]})[0] == 200
        status = get(held, f"/jobs/{second['id']}").json()
        assert status["status"] == "cancelled" and "removed" in status["error"], status
        video = get(held, f"/jobs/{second['id']}/video")
        assert video.status_code == 410 and video.json()["status"] == "cancelled", video.text
    assert wait_done(held, first["id"])["status"] == "succeeded"
