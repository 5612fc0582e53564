"""Inside the real server: NaN/Inf stops the run with the dtype and the remedy and writes no
file (issue 5 item 6); the sampler's latents are bit-identical for a seed (item 8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.host.test_errors import base_prompt

pytestmark = pytest.mark.host


def dit_variant(comfy, name: str, dtype: torch.dtype, scale_w1: float = 1.0) -> str:
    """The demo DiT stored in ``dtype``, its first MLP weight scaled, under a new name."""
    src = comfy.base / "models" / "diffusion_models" / comfy.demo_files["dit"]
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    sd = load_file(src)
    sd["blocks.0.mlp_x.w1.weight"] = sd["blocks.0.mlp_x.w1.weight"] * scale_w1
    sd = {k: v if k == "pos_frequencies" else v.to(dtype) for k, v in sd.items()}
    save_file(sd, src.parent / name, metadata=metadata)
    return name


def written(comfy, prefix: str) -> list[Path]:
    folder = comfy.output_dir / Path(prefix).parent
    return sorted(folder.glob(Path(prefix).name + "*")) if folder.is_dir() else []


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    return error


def test_fp16_overflow_fails_naming_dtype_and_remedy_and_writes_nothing(comfy):
    """An fp16 DiT that overflows: an execution_error, no black video; bf16 storage runs."""
    name = dit_variant(comfy, "overflow_fp16_dit.safetensors", torch.float16, scale_w1=1e4)
    prompt = base_prompt(comfy.demo_files, seed=3)
    prompt["dit"]["inputs"]["dit_name"] = name
    prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/overflow_fp16"
    error = execution_error(comfy.run(prompt))
    assert error["node_type"] == "Mochi1Sampler"
    assert error["exception_type"].endswith("NonFiniteError"), error["exception_type"]
    message = error["exception_message"]
    assert "at step 1 of 2 in float16" in message and "use bf16 or fp32" in message, message
    assert written(comfy, "Mochi1/overflow_fp16") == []

    prompt["dit"]["inputs"]["weight_dtype"] = "bf16"  # the remedy the message names
    assert comfy.run(prompt)["status"]["status_str"] == "success"
    assert len(written(comfy, "Mochi1/overflow_fp16")) == 1


def test_a_nan_weight_fails_before_decoding(comfy):
    name = dit_variant(comfy, "nan_weight_dit.safetensors", torch.float32, float("nan"))
    prompt = base_prompt(comfy.demo_files, seed=4)
    prompt["dit"]["inputs"]["dit_name"] = name
    prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/nan_weight"
    entry = comfy.run(prompt)
    error = execution_error(entry)
    assert "NaN at step 1 of 2 in float32" in error["exception_message"]
    assert "check the checkpoint file" in error["exception_message"]
    assert "save" not in entry["outputs"] and written(comfy, "Mochi1/nan_weight") == []


def latent_prompt(comfy, dit_name: str, seed: int, prefix: str) -> dict:
    """Sampler → the host's SaveLatent (no decode)."""
    prompt = base_prompt(comfy.demo_files, seed=seed)
    prompt["dit"]["inputs"]["dit_name"] = dit_name
    for node in ("vae", "decode", "save"):
        del prompt[node]
    prompt["keep"] = {"class_type": "SaveLatent", "inputs": {
        "samples": ["sampler", 0], "filename_prefix": prefix}}
    return prompt


def saved_latent(comfy, entry: dict) -> torch.Tensor:
    assert entry["status"]["status_str"] == "success", entry["status"]
    (item,) = entry["outputs"]["keep"]["latents"]
    return load_file(comfy.output_dir / item["subfolder"] / item["filename"])["latent_tensor"]


def test_same_seed_gives_bit_identical_latents_through_the_server(comfy):
    """A copy of the DiT under another name makes the host run the sampler again (no cache)."""
    models = comfy.base / "models" / "diffusion_models"
    copy = "determinism_copy_dit.safetensors"
    shutil.copyfile(models / comfy.demo_files["dit"], models / copy)
    first = saved_latent(comfy, comfy.run(latent_prompt(comfy, comfy.demo_files["dit"], 77,
                                                        "latents/seed77")))
    again = saved_latent(comfy, comfy.run(latent_prompt(comfy, copy, 77, "latents/seed77b")))
    other = saved_latent(comfy, comfy.run(latent_prompt(comfy, copy, 78, "latents/seed78")))
    assert first.shape == (1, 12, 3, 6, 8)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and (first - other).abs().mean() > 0.01
