"""A LoRA strength change through the server reads no weights again (issue 11 item 3).

The LoRA is a host patch on a clone of the DiT the loader keeps, so a strength change costs what
it costs with the host's own UNETLoader + LoraLoaderModelOnly: the host re-patches the layer, and
no file is read. (Servers started with ``--lowvram`` or ``--novram`` cannot run here: ComfyUI
0.3.75 refuses them together with ``--cpu``, and without ``--cpu`` it needs a CUDA driver to
start; where the models go under those flags is ``test_placement_flags``, what a partial load
does ``test_host_management``.)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.host.media import decode_frames, saved_files
from tests.host.test_errors import base_prompt

pytestmark = pytest.mark.host

DIT_READ = re.compile(r"(\S+): read the DiT \(.*, ([\d.]+) MB\)")


def frames_digest(server, entry: dict) -> str:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    (results,) = saved_files(server, entry).values()
    return hashlib.sha256(decode_frames(results[0]["path"]).tobytes()).hexdigest()


def test_a_lora_strength_change_reads_no_weights(comfy, capsys):
    """Three runs: LoRA at 0.8, at 0.4, at 0.8 again, on a DiT file of their own. Only the first
    reads it (the loader logs every read with its size); the second gives other frames and the
    third the first's exactly (the host's patches are undone and redone, not stacked)."""
    server, folder = comfy, comfy.base / "models" / "diffusion_models"
    shutil.copy(folder / server.demo_files["dit"], folder / "strength_dit.safetensors")
    files = {**server.demo_files, "dit": "strength_dit.safetensors"}
    dit = load_file(folder / "strength_dit.safetensors")
    out_features, in_features = dit["blocks.0.attn.qkv_x.weight"].shape
    g = torch.Generator().manual_seed(1)
    save_file({"blocks.0.attn.qkv_x.lora_A": torch.randn(4, in_features, generator=g),
               "blocks.0.attn.qkv_x.lora_B": torch.randn(out_features, 4, generator=g)},
              server.base / "models" / "loras" / "strength.safetensors")
    runs = []
    for strength in (0.8, 0.4, 0.8):
        prompt = base_prompt(files, seed=5)
        prompt["dit"]["inputs"].update(lora_1="strength.safetensors", lora_1_strength=strength)
        before, start = len(server.log()), time.monotonic()
        entry = server.run(prompt)
        seconds, log = time.monotonic() - start, server.log()[before:]
        reads = [float(mb) for name, mb in DIT_READ.findall(log) if name == files["dit"]]
        runs.append((frames_digest(server, entry), reads, seconds))
    (first, first_reads, first_s), (second, reads, second_s), (third, third_reads, _) = runs
    assert len(first_reads) == 1, first_reads
    assert reads == [] and third_reads == [], "a strength change read the DiT file again"
    assert second != first and third == first
    with capsys.disabled():
        print(f"\n[lora strength change] first run {first_s:.2f} s (DiT read: "
              f"{first_reads[0]:.1f} MB); strength change {second_s:.2f} s (DiT read: none)")
