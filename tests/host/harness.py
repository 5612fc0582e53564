"""The one ComfyUI server of a test session, shared by ``tests/host`` and ``tests/browser``.

A throw-away base directory, the pack symlinked into its ``custom_nodes``, the small generated
demo weights in its model folders, loopback only.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from scripts.comfy_server import ComfyServer, fill_demo_models, seed_base, start_server, stop_server

__all__ = ["API_KEY", "API_SETTINGS", "ComfyServer", "acquire", "release"]

# The generation API is on in the session server: a key, the tiny demo size, a small queue limit.
API_KEY = "test-key-" + uuid.uuid4().hex
API_SETTINGS = {"MOCHI_API_KEY": API_KEY, "MOCHI_API_WIDTH": "64", "MOCHI_API_HEIGHT": "48",
                "MOCHI_API_MAX_QUEUE": "4", "MOCHI_API_SYNC_TIMEOUT": "300"}


class _Shared:
    """The one server of a session, started by the first test directory that needs it."""

    server: ComfyServer | None = None
    users = 0


def acquire(tmp_root: Path) -> ComfyServer:
    if _Shared.server is None:
        base = tmp_root / f"comfy-{uuid.uuid4().hex[:8]}"
        base.mkdir(parents=True)
        seed_base(base)
        names = fill_demo_models(base / "models")
        models = {"MOCHI_API_DIT": names["dit"], "MOCHI_API_VAE": names["vae"],
                  "MOCHI_API_T5": names["t5"]}
        server = start_server(base, ("--preview-method", "latent2rgb"),
                              env={**API_SETTINGS, **models})
        server.demo_files = names
        _Shared.server = server
    _Shared.users += 1
    return _Shared.server


def release() -> None:
    _Shared.users -= 1
    if _Shared.users <= 0 and _Shared.server is not None:
        stop_server(_Shared.server)
        _Shared.server = None
