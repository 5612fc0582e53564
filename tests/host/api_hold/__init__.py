"""A test-only ComfyUI extension: holds an API job inside its first progress report.

``tests/host/test_api.py`` installs it (next to the pack) in a server of its own, so that a
generation job can be held in the ``running`` state for as long as a test needs, whatever the
machine's speed, and released by the test:

* ``POST /api_hold/arm``: the next progress report of a prompt queued by the generation API
  (client id ``mochi_api``) blocks the host's worker thread;
* ``GET /api_hold/held``: answers once a job is held (waits for it; ``{"held": false}`` after
  ``HOLD_LIMIT`` seconds);
* ``POST /api_hold/release``: lets the held job go on. The host's own progress hook then runs as
  usual, so an interrupt sent while the job was held stops it at that step.

No node is registered. The hold gives up by itself after ``HOLD_LIMIT`` seconds so that a
failing test cannot leave the server stuck.
"""

from __future__ import annotations

import asyncio
import threading

import comfy.utils
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}
API_CLIENT = "mochi_api"
HOLD_LIMIT = 120.0


class Hold:
    """One hold at a time: armed by the test, taken by the worker, released by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.armed = False
        self.held = threading.Event()
        self.released = threading.Event()

    def arm(self) -> None:
        with self.lock:
            self.held.clear()
            self.released.clear()
            self.armed = True

    def take(self) -> bool:
        """Called by the worker: True (once) when the armed hold is for this report."""
        server = PromptServer.instance
        with self.lock:
            if not self.armed or server.client_id != API_CLIENT:
                return False
            self.armed = False
        self.held.set()
        return True


HOLD = Hold()


def install_hook() -> None:
    """Wrap the host's progress hook once (the host sets it after loading the extensions)."""
    original = comfy.utils.PROGRESS_BAR_HOOK
    if getattr(original, "api_hold", False):
        return

    def hook(*args, **kwargs):
        if HOLD.take():
            HOLD.released.wait(HOLD_LIMIT)
        return original(*args, **kwargs)

    hook.api_hold = True
    comfy.utils.set_progress_bar_global_hook(hook)


routes = PromptServer.instance.routes


@routes.post("/api_hold/arm")
async def arm(request: web.Request) -> web.Response:
    install_hook()
    HOLD.arm()
    return web.json_response({"armed": True})


@routes.get("/api_hold/held")
async def held(request: web.Request) -> web.Response:
    return web.json_response({"held": await asyncio.to_thread(HOLD.held.wait, HOLD_LIMIT)})


@routes.post("/api_hold/release")
async def release(request: web.Request) -> web.Response:
    HOLD.released.set()
    return web.json_response({"released": True})
