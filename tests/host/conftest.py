"""Fixtures of the tests inside a real ComfyUI server (marked ``host``).

One server per session (see ``harness.py``), and the bundled workflows converted to API
prompts once, by the frontend's own ``app.graphToPrompt()`` in headless Chromium.
"""

from __future__ import annotations

import pytest

from tests.host import harness
from tests.host.frontend import convert_all


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The running ComfyUI server with this pack and the demo weights."""
    server = harness.acquire(tmp_path_factory.getbasetemp())
    yield server
    harness.release()


@pytest.fixture(scope="session")
def api_prompts(comfy) -> dict[str, dict]:
    """Every bundled workflow as an API prompt, by ``app.graphToPrompt()``."""
    return convert_all(comfy.url)
