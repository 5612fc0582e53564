"""The one ComfyUI server of a test session, shared by ``tests/host`` and ``tests/browser``.

A throw-away base directory, the pack symlinked into its ``custom_nodes``, the small generated
demo weights in its model folders, loopback only (``../shared/HOST.md``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from scripts.comfy_server import ComfyServer, fill_demo_models, seed_base, start_server, stop_server

__all__ = ["ComfyServer", "acquire", "release"]


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
        server = start_server(base, ("--preview-method", "latent2rgb"))
        server.demo_files = names
        _Shared.server = server
    _Shared.users += 1
    return _Shared.server


def release() -> None:
    _Shared.users -= 1
    if _Shared.users <= 0 and _Shared.server is not None:
        stop_server(_Shared.server)
        _Shared.server = None
