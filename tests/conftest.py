"""Shared test configuration.

The ComfyUI host used as an oracle and as the server under test lives in ``.host/ComfyUI``
(made by ``scripts/setup.sh``); ``MOCHI_TEST_HOST`` may point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import netguard

ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = Path(os.environ.get("MOCHI_TEST_HOST", ROOT / ".host" / "ComfyUI"))
#: Key names and shapes of the released checkpoints (data copied into the repository: no test
#: reads anything outside the checkout).
KEYS_DIR = ROOT / "tests" / "data" / "keys"


def pytest_configure(config: pytest.Config) -> None:
    """No test may reach the network: non-loopback connects fail (``tests/netguard.py``).

    Installed before collection, so imports made while collecting are covered too.
    """
    netguard.install()


def pytest_collection_finish(session: pytest.Session) -> None:
    if netguard.BLOCKED:
        raise RuntimeError(f"outbound connections attempted while collecting: {netguard.BLOCKED}")


@pytest.fixture(autouse=True)
def _no_outbound_connections():
    """Fail a test during which a connection was refused, even if the code swallowed it."""
    before = len(netguard.BLOCKED)
    yield
    attempts = netguard.BLOCKED[before:]
    assert not attempts, f"outbound connections attempted (and blocked): {attempts}"


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """The input shapes of the ``torch._scaled_mm`` calls (fp8 matmuls; they still run) made by
    the test, after the core's one-time device probe has run."""
    from mochi_core import ops  # noqa: PLC0415

    ops.fp8_compute_problem(torch.device("cpu"))
    calls, real = [], torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    return calls


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def import_host():
    """Make the ComfyUI snapshot importable as an oracle (CPU mode), or fail loudly."""
    import sys

    if not (HOST_DIR / "comfy").is_dir():
        raise RuntimeError(f"ComfyUI host not found at {HOST_DIR}; run scripts/setup.sh")
    if str(HOST_DIR) not in sys.path:
        sys.path.insert(0, str(HOST_DIR))
    from comfy.cli_args import args  # noqa: PLC0415

    args.cpu = True
