"""The host's device flags apply to the Mochi models as to its own (issue 11 item 2).

Each case runs ``placement_probe`` in a process of its own: the host parses the flags with its own
argument parser and computes its memory state at import, on a simulated 24 GB GPU (this machine
has none; nothing runs on it); the loader nodes build the three models from the demo checkpoints;
their patchers' devices and the T5's dtype are compared with what each flag means for the host's
own models (``comfy/model_management.py``): ``--lowvram``/``--novram`` run text encoders on the
CPU, ``--cpu-vae`` the VAE, ``--gpu-only`` keeps everything on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mochi_core import demo
from tests.conftest import ROOT

pytestmark = pytest.mark.host

GPU, CPU = "cuda:0", "cpu"
BF16, FP32 = ["torch.bfloat16"], ["torch.float32"]
EXPECTED = {
    "": {"vram_state": "NORMAL_VRAM", "dit": [GPU, CPU], "vae": [GPU, CPU], "t5": [GPU, CPU],
         "t5_dtype": BF16},
    "--lowvram": {"vram_state": "LOW_VRAM", "dit": [GPU, CPU], "vae": [GPU, CPU],
                  "t5": [CPU, CPU], "t5_dtype": FP32},
    "--novram": {"vram_state": "NO_VRAM", "dit": [GPU, CPU], "vae": [GPU, CPU],
                 "t5": [CPU, CPU], "t5_dtype": FP32},
    "--cpu-vae": {"vram_state": "NORMAL_VRAM", "dit": [GPU, CPU], "vae": [CPU, CPU],
                  "t5": [GPU, CPU], "t5_dtype": BF16},
    "--gpu-only": {"vram_state": "HIGH_VRAM", "dit": [GPU, GPU], "vae": [GPU, GPU],
                   "t5": [GPU, GPU], "t5_dtype": BF16},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("placement")
    demo.make_demo_checkpoints(path)
    return path


@pytest.mark.parametrize("flag", list(EXPECTED))
def test_each_model_lands_where_the_flag_says(folder, flag):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "tests.host.placement_probe", str(folder), *flag.split()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    placed = json.loads(run.stdout.strip().splitlines()[-1])
    assert placed == EXPECTED[flag]
