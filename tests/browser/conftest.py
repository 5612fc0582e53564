"""Fixtures of the frontend tests (marked ``browser``): the session's one ComfyUI server and a
headless Chromium page on it."""

from __future__ import annotations

import pytest

from tests.host import harness
from tests.host.frontend import browser_page


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The running ComfyUI server with this pack and the demo weights (shared with tests/host)."""
    server = harness.acquire(tmp_path_factory.getbasetemp())
    yield server
    harness.release()


@pytest.fixture(scope="module")
def page(comfy):
    """A frontend page, ready."""
    with browser_page(comfy.url) as p:
        yield p
