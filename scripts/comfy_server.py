"""Start and talk to a real ComfyUI server with this pack installed (loopback only).

Used by the host/browser tests, the main job (``scripts/run_main_job.py``) and the UI launcher
(``scripts/start_ui.py``): a base directory of its own (``--base-directory``) with the pack
symlinked into ``custom_nodes``, model folders, and a seeded frontend settings file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = Path(os.environ.get("MOCHI_TEST_HOST", ROOT / ".host" / "ComfyUI"))

PACK_NAME = "mochi-nodes"
#: The clip the video-to-video template loads (``scripts/make_input_clip.py``), copied into each
#: server's ``input/`` folder so that the template runs as it is.
INPUT_CLIP = ROOT / "workflows" / "mochi1_input.mp4"
STARTUP_TIMEOUT = 120.0
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,  # draw node text at any zoom (screenshots)
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    """A running host: its base directory, URL, process and log."""

    base: Path
    port: int
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    demo_files: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    # -- HTTP -------------------------------------------------------------------------------
    def request(self, path: str, body: dict | None = None, timeout: float = 30.0):
        """``(status, parsed JSON or text)`` of a GET (no body) or a JSON POST."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 -- http on loopback only
            self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 -- loopback only
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str):
        status, body = self.request(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body}"
        return body

    def queue(self, prompt: dict, extra_data: dict | None = None):
        """POST /prompt; ``(status, body)`` so tests can look at validation errors."""
        payload = {"prompt": prompt, "client_id": "tests"}
        if extra_data:
            payload["extra_data"] = extra_data
        return self.request("/prompt", payload)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The /history entry of a prompt once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            self._check_alive()
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 300.0, extra_data: dict | None = None) -> dict:
        """Queue a prompt that must validate, and return its finished history entry."""
        status, body = self.queue(prompt, extra_data)
        assert status == 200, f"prompt refused: {json.dumps(body, indent=1)[:4000]}"
        return self.wait(body["prompt_id"], timeout)

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the ComfyUI server exited:\n{self.log()[-4000:]}")


def seed_base(base: Path) -> None:
    """Folders, the pack symlink and the frontend settings of a fresh base directory."""
    for sub in ("custom_nodes", "input", "output", "temp", "user/default",
                "models/diffusion_models", "models/vae", "models/text_encoders", "models/loras"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT, base / "custom_nodes" / PACK_NAME)
    (base / "user/default/comfy.settings.json").write_text(json.dumps(SETTINGS))
    place_input_clip(base)


def place_input_clip(base: Path) -> Path:
    """Copy the video-to-video template's input clip into ``base/input`` (kept if present)."""
    target = base / "input" / INPUT_CLIP.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(INPUT_CLIP, target)
    return target


def fill_demo_models(models: Path, seed: int = 0) -> dict[str, str]:
    """Write the small random-weight demo checkpoints into the host's model folders.

    Returns the file name of each role: ``dit`` (diffusion_models), ``vae`` (vae, encoder and
    decoder in ComfyUI's combined layout) and ``t5`` (text_encoders).
    """
    from mochi_core import demo

    made = demo.make_demo_checkpoints(models / "demo_tmp", seed=seed)
    names = {}
    for role, folder in (("dit", "diffusion_models"), ("vae", "vae"), ("t5", "text_encoders")):
        path = Path(getattr(made, role))
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), models / folder / path.name)
        names[role] = path.name
    shutil.rmtree(models / "demo_tmp", ignore_errors=True)
    return names


def start_server(base: Path, extra_args: tuple[str, ...] = (), cpu: bool = True,
                 port: int | None = None, env: dict[str, str] | None = None) -> ComfyServer:
    """Start a host on a loopback port (a free one by default); wait until our nodes answer.

    ``env`` adds environment variables (e.g. the generation API's ``MOCHI_API_*`` settings).
    """
    server = ComfyServer(base=base, port=port or free_port(), log_path=base / "server.log")
    cmd = [sys.executable, str(HOST_DIR / "main.py"), "--base-directory", str(base),
           "--database-url", "sqlite:///:memory:", "--listen", "127.0.0.1",
           "--port", str(server.port), "--disable-auto-launch", "--dont-print-server",
           "--disable-api-nodes", *(("--cpu",) if cpu else ()), *extra_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1",
               **(env or {}))
    with open(server.log_path, "wb") as log:
        server.process = subprocess.Popen(cmd, cwd=HOST_DIR, stdout=log,  # noqa: S603
                                          stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        server._check_alive()
        try:
            status, _ = server.request("/object_info/Mochi1Sampler", timeout=5)
            if status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise TimeoutError(f"ComfyUI did not start in {STARTUP_TIMEOUT}s:\n{server.log()[-4000:]}")


def stop_server(server: ComfyServer) -> None:
    """Stop the server we started, by its own PID."""
    proc = server.process
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


