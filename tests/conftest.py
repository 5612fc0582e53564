"""Shared test configuration.

The ComfyUI host used as an oracle and as the server under test lives in ``.host/ComfyUI``
(made by ``scripts/setup.sh``); ``MOCHI_TEST_HOST`` may point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = Path(os.environ.get("MOCHI_TEST_HOST", ROOT / ".host" / "ComfyUI"))
SHARED_DIR = Path(os.environ.get("MOCHI_SHARED_DIR", ROOT.parent / "shared"))
KEYS_DIR = SHARED_DIR / "mochi" / "keys"


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
