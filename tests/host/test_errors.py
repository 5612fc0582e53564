"""Invalid prompts are refused with HTTP 400 naming the input; runtime failures reach /history
with a clear message; a cancel through POST /interrupt ends a prompt and the next one runs."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scripts.comfy_server import PACK_NAME
from tests.conftest import ROOT
from tests.host.ws import WsWatcher

pytestmark = pytest.mark.host


def base_prompt(files: dict[str, str], **sampler) -> dict:
    """Text-to-video on the demo weights, 64×48, 13 frames, 2 steps."""
    return {
        "dit": {"class_type": "Mochi1DiTLoader", "inputs": {
            "dit_name": files["dit"], "weight_dtype": "default", "attention": "sdpa",
            "compile": "off", "lora_1": "none", "lora_1_strength": 1.0, "lora_2": "none",
            "lora_2_strength": 1.0}},
        "t5": {"class_type": "Mochi1TextEncoderLoader", "inputs": {"t5_name": files["t5"],
                                                                   "dtype": "fp32"}},
        "text": {"class_type": "Mochi1TextEncode", "inputs": {
            "text_encoder": ["t5", 0], "positive": "waves on a beach", "negative": ""}},
        "sampler": {"class_type": "Mochi1Sampler", "inputs": {
            "model": ["dit", 0], "positive": ["text", 0], "negative": ["text", 1],
            "width": 64, "height": 48, "frames": 13, "steps": 2, "cfg": 6.0, "seed": 0,
            "denoise": 1.0, "threshold_noise": 0.025, "linear_steps": 0, "cfg_schedule": "",
            "batch_cfg": "auto", **sampler}},
        "vae": {"class_type": "Mochi1VAELoader", "inputs": {
            "vae_name": files["vae"], "second_file": "none", "dtype": "fp32"}},
        "decode": {"class_type": "Mochi1VAEDecode", "inputs": {
            "decoder": ["vae", 0], "samples": ["sampler", 0], "tile_size": 0,
            "tile_overlap": 64, "frame_chunk": 0}},
        "save": {"class_type": "Mochi1SaveVideo", "inputs": {
            "images": ["decode", 0], "fps": 30.0, "format": "mp4 (H.264)", "quality": 85,
            "filename_prefix": "Mochi1/errors"}},
    }


def pack_crashes(body: dict) -> list[dict]:
    """The validation errors of a 400 that are a traceback raised in the pack's own code, or a
    pack ``validate_inputs`` the host could not call. The host's own crashes (on a link to a
    node that does not exist, a cycle, an output index out of range) are not the pack's."""
    pack = [str(where / package) for where in (ROOT, Path(PACK_NAME))
            for package in ("nodes", "mochi_core", "mochi_api")]
    crashes = []
    for error in [e for node in body.get("node_errors", {}).values() for e in node["errors"]]:
        info = error.get("extra_info", {})
        innermost = (info.get("traceback") or [""])[-1]
        if any(p in innermost for p in pack) or \
                "validate_inputs()" in str(info.get("exception_message", "")):
            crashes.append(error)
    return crashes


def refused(comfy, prompt: dict, node: str) -> str:
    """POST a prompt that must be refused; the error texts of ``node``, joined."""
    status, body = comfy.queue(prompt)
    assert status == 400, f"accepted: {body}"
    assert node in body["node_errors"], json.dumps(body)[:2000]
    errors = body["node_errors"][node]["errors"]
    crashed = pack_crashes(body)
    assert not crashed, f"the pack's validation crashed: {json.dumps(crashed)[:2000]}"
    return " | ".join(f"{e['message']}: {e['details']} {e['extra_info'].get('input_name', '')}"
                      for e in errors)


@pytest.mark.parametrize(("node", "field", "value", "expected"), [
    ("sampler", "frames", 50, ["frames", "6k+1", "49", "55"]),
    ("sampler", "width", 850, ["width", "multiple of 16", "nearest valid: 848"]),
    ("sampler", "height", 8, ["height", "multiple of 16"]),
    ("sampler", "cfg_schedule", "6, lots", ["cfg_schedule", "comma-separated"]),
    ("sampler", "linear_steps", 2, ["linear_steps", "below steps"]),
    ("sampler", "batch_cfg", "sometimes", ["batch_cfg", "auto", "batched", "separate"]),
    ("dit", "weight_dtype", "fp16", ["weight_dtype", "bf16", "fp8_e4m3fn_fast", "fp32"]),
    ("dit", "attention", "xformers", ["attention", "sdpa", "flash", "sage"]),
    ("dit", "compile", "on", ["compile", "off", "inductor"]),
    ("dit", "dit_name", "missing.safetensors", ["dit_name", "diffusion_models"]),
    ("dit", "lora_1", "no_such_lora.safetensors", ["lora_1", "loras"]),
    ("vae", "vae_name", "missing.safetensors", ["vae_name", "'vae' model folder"]),
    ("t5", "t5_name", "missing.safetensors", ["t5_name", "text_encoders"]),
    ("decode", "tile_size", 40, ["tile_size", "multiple of 16"]),
    ("save", "format", "avi", ["format", "mp4 (H.264)", "gif"]),
    ("save", "fps", 0.5, ["fps", "between 1.0 and 60.0"]),
    ("save", "filename_prefix", "../../escape", ["filename_prefix", "inside the output folder"]),
    ("save", "filename_prefix", "/tmp/abs", ["filename_prefix", "inside the output folder"]),
])
def test_invalid_inputs_are_refused_naming_the_input(comfy, node, field, value, expected):
    prompt = base_prompt(comfy.demo_files)
    prompt[node]["inputs"][field] = value
    text = refused(comfy, prompt, node)
    for word in expected:
        assert word in text, f"{word!r} not in {text!r}"


def test_a_decoder_wired_as_encoder_is_refused(comfy):
    prompt = base_prompt(comfy.demo_files)
    prompt["encode"] = {"class_type": "Mochi1VAEEncode", "inputs": {
        "encoder": ["vae", 0], "images": ["decode", 0], "frame_handling": "reject"}}
    prompt["sampler"]["inputs"]["latent"] = ["encode", 0]
    text = refused(comfy, prompt, "encode")
    assert "encoder" in text and "MOCHI_VAE_DECODER" in text and "MOCHI_VAE_ENCODER" in text


def test_validation_happens_before_any_model_loads(comfy):
    """A refused prompt runs nothing: nothing is queued, no history entry appears."""
    before = comfy.get("/history")
    prompt = base_prompt(comfy.demo_files, frames=14)
    refused(comfy, prompt, "sampler")
    assert comfy.get("/history").keys() == before.keys()
    assert comfy.get("/queue")["queue_pending"] == []


def test_runtime_failure_reaches_history_with_a_clear_message(comfy):
    """Frames that are not 6k+1 reach the encoder (their count is known only at run time)."""
    prompt = base_prompt(comfy.demo_files)
    prompt["frames"] = {"class_type": "ImageFromBatch", "inputs": {
        "image": ["decode", 0], "batch_index": 0, "length": 10}}
    prompt["encode"] = {"class_type": "Mochi1VAEEncode", "inputs": {
        "encoder": ["vae", 1], "images": ["frames", 0], "frame_handling": "reject"}}
    prompt["resample"] = copy.deepcopy(prompt["sampler"])
    prompt["resample"]["inputs"].update(latent=["encode", 0], denoise=0.5)
    prompt["save"]["inputs"]["images"] = ["redecode", 0]
    prompt["redecode"] = {"class_type": "Mochi1VAEDecode", "inputs": {
        "decoder": ["vae", 0], "samples": ["resample", 0], "tile_size": 0, "tile_overlap": 64,
        "frame_chunk": 0}}
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "Mochi1VAEEncode"
    assert "10 frames" in error["exception_message"]
    assert "6k+1" in error["exception_message"] and "trim to 6k+1" in error["exception_message"]


def test_progress_per_step_and_previews(comfy):
    with WsWatcher(comfy.url) as ws:
        entry = comfy.run(base_prompt(comfy.demo_files, steps=4, seed=5))
        assert entry["status"]["status_str"] == "success"
        steps = ws.progress(entry["prompt"][1], "sampler")
        assert steps == [(i, 4) for i in range(1, 5)], steps
        assert ws.progress(entry["prompt"][1], "decode"), "no decode progress"
        assert any(m.get("type") == "binary" for m in ws.messages), "no latent preview sent"


def test_interrupt_during_sampling_ends_the_prompt_and_the_next_runs(comfy):
    long_prompt = base_prompt(comfy.demo_files, steps=1000, width=848, height=480, frames=31,
                              seed=11)
    with WsWatcher(comfy.url) as ws:
        status, body = comfy.queue(long_prompt)
        assert status == 200, body
        prompt_id = body["prompt_id"]
        ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("node") == "sampler"
                    and m["data"].get("prompt_id") == prompt_id and m["data"]["value"] >= 2)
        done_before = max(v for v, _ in ws.progress(prompt_id, "sampler"))
        sent = time.monotonic()
        status, _ = comfy.request("/interrupt", {})
        assert status == 200
        entry = comfy.wait(prompt_id, timeout=60)
        stopped_after = time.monotonic() - sent
        done = max(v for v, _ in ws.progress(prompt_id, "sampler"))
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    (stop,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert stop["node_type"] == "Mochi1Sampler"
    assert done <= done_before + 2, f"ran {done - done_before} more steps after the interrupt"
    assert stopped_after < 30, f"took {stopped_after:.1f}s to stop"

    nxt = comfy.run(base_prompt(comfy.demo_files, seed=12))
    assert nxt["status"]["status_str"] == "success"


def latent_file(comfy, name: str, shape: tuple[int, ...]) -> str:
    """A ``.latent`` file for the host's LoadLatent node, holding zeros of ``shape``."""
    save_file({"latent_tensor": torch.zeros(shape), "latent_format_version_0": torch.tensor([])},
              comfy.input_dir / name)
    return name


def foreign_latent(comfy, kind: str) -> dict:
    """A host node making a LATENT that is not a Mochi video latent."""
    if kind == "sd_image":  # 1 x 4 x 6 x 8: Stable Diffusion's empty image latent
        return {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48,
                                                             "batch_size": 1}}
    shapes = {"zero_frames": (1, 12, 0, 6, 8), "16_channels": (1, 16, 2, 6, 8),
              "image_12_channels": (1, 12, 6, 8)}
    name = latent_file(comfy, f"foreign_{kind}.latent", shapes[kind])
    return {"class_type": "LoadLatent", "inputs": {"latent": name}}


@pytest.mark.parametrize(("kind", "node", "words"), [
    ("sd_image", "sampler", ["latent", "4 channels", "EmptyLatentImage", "EmptyMochiLatentVideo",
                             "Mochi 1 VAE Encode"]),
    ("sd_image", "decode", ["samples", "4 channels", "EmptyLatentImage"]),
    ("zero_frames", "sampler", ["latent", "0 latent frames", "at least 1"]),
    ("zero_frames", "decode", ["samples", "0 latent frames", "at least 1"]),
    ("16_channels", "sampler", ["latent", "16 channels", "12"]),
    ("image_12_channels", "decode", ["samples", "1×12×6×8", "B × 12 × T × H/8 × W/8"]),
])
def test_a_latent_that_is_not_a_mochi_video_is_refused_first(comfy, kind, node, words):
    """A LATENT is a link, known only when the node runs: its shape is checked first thing,
    before the sampler samples or the decoder decodes, with a message saying what it got."""
    prompt = base_prompt(comfy.demo_files, seed=41)
    prompt["foreign"] = foreign_latent(comfy, kind)
    prompt["save"]["inputs"]["filename_prefix"] = f"Mochi1/foreign_{kind}"
    if node == "sampler":
        prompt["sampler"]["inputs"]["latent"] = ["foreign", 0]
    else:
        prompt["decode"]["inputs"]["samples"] = ["foreign", 0]
    with WsWatcher(comfy.url) as ws:
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "error", entry["status"]
        assert ws.progress(entry["prompt"][1], node) == [], "the node started working"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_id"] == node, error["node_id"]
    for word in words:
        assert word in error["exception_message"], (word, error["exception_message"])
    assert not list(comfy.output_dir.glob(f"Mochi1/foreign_{kind}*"))


def test_images_beyond_the_frame_limit_are_refused_before_encoding(comfy):
    """An IMAGE is a link too: the encoder checks its shape first (here 362 frames, one more
    than the 361 the pack makes) instead of encoding it and failing later."""
    prompt = base_prompt(comfy.demo_files, seed=43)
    prompt["frames"] = {"class_type": "EmptyImage", "inputs": {
        "width": 16, "height": 16, "batch_size": 362, "color": 0}}
    prompt["encode"] = {"class_type": "Mochi1VAEEncode", "inputs": {
        "encoder": ["vae", 1], "images": ["frames", 0], "frame_handling": "trim to 6k+1"}}
    prompt["sampler"]["inputs"]["latent"] = ["encode", 0]
    prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/too_many_frames"
    with WsWatcher(comfy.url) as ws:
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "error", entry["status"]
        assert ws.progress(entry["prompt"][1], "encode") == [], "the encoder started"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_id"] == "encode", error
    for word in ("images", "362", "361 frames"):
        assert word in error["exception_message"], (word, error["exception_message"])
