"""Loader options inside the host: LoRA stack, fp8 storage, VAE files split in halves, packaging."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import tomllib
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import HOST_DIR, ROOT
from tests.host.media import decode_frames, saved_files
from tests.host.test_errors import base_prompt

pytestmark = pytest.mark.host


def frames_digest(comfy, entry: dict) -> str:
    """A digest of the decoded frames (the file itself also holds the prompt, which differs)."""
    (results,) = [r for r in saved_files(comfy, entry).values()]
    return hashlib.sha256(decode_frames(results[0]["path"]).tobytes()).hexdigest()


def ui_text(entry: dict, node: str) -> str:
    return " ".join(entry["outputs"][node]["text"])


@pytest.fixture(scope="module")
def demo_lora(comfy) -> str:
    """A rank-4 LoRA on the first block's qkv_x of the demo DiT, in Genmo's fine-tuner layout."""
    dit = load_file(comfy.base / "models" / "diffusion_models" / comfy.demo_files["dit"])
    out_features, in_features = dit["blocks.0.attn.qkv_x.weight"].shape
    g = torch.Generator().manual_seed(0)
    lora = {"blocks.0.attn.qkv_x.lora_A": torch.randn(4, in_features, generator=g),
            "blocks.0.attn.qkv_x.lora_B": torch.randn(out_features, 4, generator=g)}
    name = "mochi_demo_lora.safetensors"
    save_file(lora, comfy.base / "models" / "loras" / name)
    return name


def test_lora_stack_changes_the_result(comfy, demo_lora):
    plain = comfy.run(base_prompt(comfy.demo_files, seed=21))
    prompt = base_prompt(comfy.demo_files, seed=21)
    prompt["dit"]["inputs"].update(lora_1=demo_lora, lora_1_strength=0.8)
    with_lora = comfy.run(prompt)
    assert with_lora["status"]["status_str"] == "success", with_lora["status"]
    assert f"LoRA: {demo_lora} x0.8" in ui_text(with_lora, "dit")
    assert frames_digest(comfy, plain) != frames_digest(comfy, with_lora)
    prompt["dit"]["inputs"].update(lora_1_strength=0.0)  # strength 0 == no LoRA
    assert frames_digest(comfy, comfy.run(prompt)) == frames_digest(comfy, plain)


def test_fp8_weight_storage_runs(comfy):
    prompt = base_prompt(comfy.demo_files, seed=22)
    prompt["dit"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_vae_halves_in_separate_files(comfy):
    """Genmo ships decoder.safetensors and encoder.safetensors; each half is found, and a
    missing encoder is reported clearly when video-to-video needs it."""
    folder = comfy.base / "models" / "vae"
    combined = load_file(folder / comfy.demo_files["vae"])
    for half in ("decoder", "encoder"):
        save_file({k.removeprefix(f"{half}."): v for k, v in combined.items()
                   if k.startswith(f"{half}.")}, folder / f"demo_genmo_{half}.safetensors")
    prompt = base_prompt(comfy.demo_files, seed=23)
    prompt["vae"]["inputs"].update(vae_name="demo_genmo_decoder.safetensors",
                                   second_file="demo_genmo_encoder.safetensors")
    prompt["encode"] = {"class_type": "Mochi1VAEEncode", "inputs": {
        "encoder": ["vae", 1], "images": ["decode", 0], "frame_handling": "reject"}}
    prompt["relatent"] = {"class_type": "Mochi1VAEDecode", "inputs": {
        "decoder": ["vae", 0], "samples": ["encode", 0], "tile_size": 0, "tile_overlap": 64,
        "frame_chunk": 1}}
    prompt["save"]["inputs"]["images"] = ["relatent", 0]
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "found: encoder + decoder" in ui_text(entry, "vae")

    prompt["vae"]["inputs"]["second_file"] = "none"
    entry = comfy.run(prompt)
    assert "found: decoder" in ui_text(entry, "vae")
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "Mochi1VAEEncode"
    assert "no VAE encoder" in error["exception_message"]


def test_packaging_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")]
    assert meta["project"]["dependencies"] == requirements
    assert not any(re.match(r"torch\b", r) for r in requirements)
    floor = meta["tool"]["comfy"]["requires-comfyui"]
    version = re.search(r'"([\d.]+)"', (HOST_DIR / "comfyui_version.py").read_text()).group(1)
    assert floor == f">={version}", "the floor is the host version the tests run on"
    ignored = (ROOT / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", "scripts/", ".ci/"} <= set(ignored)


def test_cfg_schedule_overrides_the_constant_cfg(comfy):
    """A one-value schedule is that constant cfg; a ramp gives a different video."""
    constant = comfy.run(base_prompt(comfy.demo_files, seed=24, steps=3, cfg=4.5))
    one_value = comfy.run(base_prompt(comfy.demo_files, seed=24, steps=3, cfg=1.0,
                                      cfg_schedule="4.5"))
    ramp = comfy.run(base_prompt(comfy.demo_files, seed=24, steps=3, cfg=4.5,
                                 cfg_schedule="6, 1"))
    assert frames_digest(comfy, one_value) == frames_digest(comfy, constant)
    assert frames_digest(comfy, ramp) != frames_digest(comfy, constant)


def tiling_node(tile_size: int, tile_overlap: int, temporal_window: int = 0) -> dict:
    return {"class_type": "Mochi1DiTTiling", "inputs": {
        "tile_size": tile_size, "tile_overlap": tile_overlap,
        "temporal_window": temporal_window, "temporal_overlap": 1, "rope": "canvas"}}


def test_dit_tiling(comfy):
    """One tile covering the video is the untiled model; smaller tiles and windows run and
    change the result (less context per tile)."""
    plain = comfy.run(base_prompt(comfy.demo_files, seed=25, steps=3))
    prompt = base_prompt(comfy.demo_files, seed=25, steps=3)
    prompt["tiling"] = tiling_node(512, 128)
    prompt["sampler"]["inputs"]["tiling"] = ["tiling", 0]
    one_tile = comfy.run(prompt)
    assert one_tile["status"]["status_str"] == "success", one_tile["status"]
    assert frames_digest(comfy, one_tile) == frames_digest(comfy, plain)
    prompt["tiling"] = tiling_node(32, 16, temporal_window=2)
    tiled = comfy.run(prompt)
    assert tiled["status"]["status_str"] == "success", tiled["status"]
    assert frames_digest(comfy, tiled) != frames_digest(comfy, plain)

    prompt["tiling"] = tiling_node(64, 64)
    status, body = comfy.queue(prompt)
    assert status == 400
    text = json.dumps(body["node_errors"]["tiling"])
    assert "tile_overlap (64) must be below tile_size (64)" in text


def test_fp8_text_encoder_file(comfy):
    """A T5 stored in fp8 e4m3fn (like t5xxl_fp8_e4m3fn.safetensors) loads and encodes."""
    folder = comfy.base / "models" / "text_encoders"
    t5 = load_file(folder / comfy.demo_files["t5"])
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and k != "shared.weight" else v
               for k, v in t5.items()}, folder / "demo_t5xxl_fp8_e4m3fn.safetensors")
    prompt = base_prompt(comfy.demo_files, seed=26)
    prompt["t5"]["inputs"]["t5_name"] = "demo_t5xxl_fp8_e4m3fn.safetensors"
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_compiled_blocks_run(comfy):
    """compile=inductor: the blocks are compiled at the first step (no eager fallback logged)."""
    prompt = base_prompt(comfy.demo_files, seed=27, steps=2)
    prompt["dit"]["inputs"]["compile"] = "inductor"
    entry = comfy.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "compile inductor" in ui_text(entry, "dit")
    log = comfy.log()
    assert "not compiling the DiT blocks" not in log
    assert "torch.compile of the DiT blocks failed" not in log


def foreign_t5_file(comfy, kind: str) -> str:
    """A file in models/text_encoders that holds no T5: a copy of the demo DiT or VAE, a
    Stable Diffusion-like checkpoint, or a safetensors file with no tensors."""
    folder, name = comfy.base / "models" / "text_encoders", f"not_t5_{kind}.safetensors"
    if kind in ("dit", "vae"):
        source = comfy.base / "models" / FOLDER_OF[kind] / comfy.demo_files[kind]
        save_file(load_file(source), folder / name)
    elif kind == "sd":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                   "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)},
                  folder / name)
    else:
        save_file({}, folder / name)
    return name


FOLDER_OF = {"dit": "diffusion_models", "vae": "vae"}


@pytest.mark.parametrize(("kind", "words"), [
    ("dit", ["looks like dit/genmo", "Mochi 1 DiT Loader"]),
    ("vae", ["looks like vae/comfy_combined", "Mochi 1 VAE Loader"]),
    ("sd", ["looks like", "another architecture"]),
    ("empty", ["looks like", "no tensors"]),
])
def test_t5_loader_names_a_file_that_is_not_a_t5(comfy, kind, words):
    """SECURITY.md's promise for the T5 loader too: the file's name, and what it looks like."""
    name = foreign_t5_file(comfy, kind)
    prompt = base_prompt(comfy.demo_files, seed=42)
    prompt["t5"]["inputs"]["t5_name"] = name
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "Mochi1TextEncoderLoader"
    for word in [name, "no T5-XXL encoder found", *words]:
        assert word in error["exception_message"], (word, error["exception_message"])


def test_conditioning_of_another_width_is_refused_before_sampling(comfy):
    """A CONDITIONING is a link: features of another text encoder (here a T5 of width 32 for a
    DiT that reads 64) are refused first thing in the sampler, naming the input and both
    widths, instead of failing inside the model."""
    from mochi_core.demo import DemoT5Size, random_t5_state_dict

    size = DemoT5Size(d_model=32, num_heads=2, d_kv=16)
    name = "demo_t5_width_32.safetensors"
    save_file(random_t5_state_dict(5, size), comfy.base / "models" / "text_encoders" / name)
    prompt = base_prompt(comfy.demo_files, seed=44)
    prompt["t5"]["inputs"]["t5_name"] = name
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_id"] == "sampler", error
    for word in ("positive", "1×256×32", "B × L × 64", "Mochi 1 Text Encode"):
        assert word in error["exception_message"], (word, error["exception_message"])
