"""Every bundled workflow, converted by the frontend's ``app.graphToPrompt()``, pointed at the
demo weights, run through ``POST /prompt`` in a real ComfyUI, and its outputs checked."""

from __future__ import annotations

import json
import time

import pytest

from mochi_api.workflow import ui_to_api
from tests.conftest import ROOT
from tests.host.frontend import bundled_workflows
from tests.host.media import DEMO_SHAPE, embedded_prompt, point_at_demo, read_video, saved_files

pytestmark = pytest.mark.host

RUNNABLE = ["mochi1_text_to_video", "mochi1_fast_preview", "mochi1_chain_upscale_canny",
            "mochi1_video_to_video"]
INPUT_VIDEO = "mochi1_input.mp4"
SHIPPED_CLIP = ROOT / "workflows" / INPUT_VIDEO
INPUT_FRAMES, INPUT_FPS = 15, 24  # not 6k+1: the workflow trims to 13
TIMINGS = ROOT / "test-artifacts" / "workflow_runs.json"


def record_timing(name: str, seconds: float, outputs: dict) -> None:
    TIMINGS.parent.mkdir(exist_ok=True)
    data = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    data[name] = {"seconds": round(seconds, 2), "outputs": outputs}
    TIMINGS.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def input_video(comfy):
    """The shipped clip (``workflows/mochi1_input.mp4``, 15 frames at 24 fps), which the harness
    places in the input folder under the name the video-to-video template loads."""
    path = comfy.input_dir / INPUT_VIDEO
    assert path.is_file(), f"the harness did not place the shipped clip in {comfy.input_dir}"
    assert path.read_bytes() == SHIPPED_CLIP.read_bytes()
    return path


def test_the_shipped_clip_is_the_one_the_template_loads(api_prompts, input_video):
    (load,) = [n for n in api_prompts["mochi1_video_to_video"].values()
               if n["class_type"] == "LoadVideo"]  # fmt: skip
    assert load["inputs"]["file"] == INPUT_VIDEO
    info = read_video(input_video)
    assert (info.frames, info.fps, info.width, info.height) == (INPUT_FRAMES, INPUT_FPS, 64, 48)
    assert SHIPPED_CLIP.stat().st_size < 32_000, "the shipped clip should stay a few KB"


def test_our_converter_matches_the_frontend(comfy, api_prompts):
    """mochi_api/workflow.py (used by the main job and the API, no browser) gives the same
    prompts as the frontend's app.graphToPrompt()."""
    object_info = comfy.get("/object_info")
    for name, workflow in bundled_workflows().items():
        ours = ui_to_api(workflow, object_info)
        theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                  for k, v in api_prompts[name].items()}
        assert ours == theirs, name


def test_every_workflow_converts(api_prompts):
    names = {p.stem for p in (ROOT / "workflows").glob("*.json")}
    assert set(api_prompts) == names
    assert set(RUNNABLE) | {"mochi1_native_interop"} == names
    for name, prompt in api_prompts.items():
        kinds = {n["class_type"] for n in prompt.values()}
        assert "Mochi1Sampler" in kinds, name
        assert "Note" not in kinds, f"{name}: graphToPrompt kept a UI-only node"


@pytest.mark.parametrize("name", RUNNABLE)
def test_workflow_runs_on_demo_weights(comfy, api_prompts, input_video, name):
    prompt = point_at_demo(api_prompts[name], comfy.demo_files)
    # The host's "unload models" + cache reset, so each workflow is timed from scratch.
    assert comfy.request("/free", {"unload_models": True, "free_memory": True})[0] == 200
    start = time.monotonic()
    entry = comfy.run(prompt, timeout=240)
    seconds = time.monotonic() - start
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]

    files = saved_files(comfy, entry)
    savers = {i for i, n in prompt.items() if n["class_type"] in ("Mochi1SaveVideo", "SaveVideo")}
    assert set(files) == savers, f"every save node wrote a file: {files} vs {savers}"
    summary = {}
    for node_id, results in files.items():
        (result,) = results
        info = read_video(result["path"])
        kind = prompt[node_id]["class_type"]
        scale = prompt[node_id]["inputs"]["filename_prefix"].endswith("upscaled") + 1
        assert (info.width, info.height) == (DEMO_SHAPE["width"] * scale,
                                            DEMO_SHAPE["height"] * scale)
        assert info.frames == DEMO_SHAPE["frames"], result["path"].name
        assert (info.frames - 1) % 6 == 0
        expected_fps = INPUT_FPS if name == "mochi1_video_to_video" else 30
        assert info.fps == pytest.approx(expected_fps, rel=0.02), result["path"].name
        if kind == "Mochi1SaveVideo":
            assert result["frames"] == info.frames and result["fps"] == pytest.approx(
                expected_fps)
            embedded = embedded_prompt(info)
            assert embedded is not None, f"{result['path'].name}: no workflow metadata"
            assert embedded[node_id]["class_type"] == "Mochi1SaveVideo"
        summary[result["path"].name] = f"{info.frames} frames {info.width}x{info.height} " \
                                       f"@ {info.fps:g} fps"
    record_timing(name, seconds, summary)


def test_native_interop_workflow_validates(comfy, api_prompts):
    """The host accepts every cross-pack link of the native workflow: the host's CLIPTextEncode
    CONDITIONING and EmptyMochiLatentVideo LATENT into our sampler, our LATENT into the host's
    VAEDecodeTiled. (Running it needs the full-size T5-XXL and VAE; see the next test.)"""
    prompt = point_at_demo(api_prompts["mochi1_native_interop"], comfy.demo_files)
    status, body = comfy.queue(prompt)
    assert status == 200 and body["node_errors"] == {}, body
    entry = comfy.wait(body["prompt_id"], timeout=120)
    if entry["status"]["status_str"] == "error":
        (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert not error["node_type"].startswith("Mochi1"), (
            f"our node failed in the native workflow: {error['exception_message']}")


def test_native_latents_and_conditioning_run_through_our_nodes(comfy, api_prompts):
    """What of the native workflow runs on tiny weights: the host's EmptyMochiLatentVideo into
    our sampler, our CONDITIONING through the host's conditioning nodes, the host's latent
    decoded by our decoder, our frames into the host's CreateVideo + SaveVideo."""
    n = comfy.demo_files
    prompt = {
        "dit": {"class_type": "Mochi1DiTLoader", "inputs": {
            "dit_name": n["dit"], "weight_dtype": "default", "attention": "sdpa",
            "compile": "off", "lora_1": "none", "lora_1_strength": 1.0, "lora_2": "none",
            "lora_2_strength": 1.0}},
        "t5": {"class_type": "Mochi1TextEncoderLoader", "inputs": {"t5_name": n["t5"],
                                                                   "dtype": "fp32"}},
        "text": {"class_type": "Mochi1TextEncode", "inputs": {
            "text_encoder": ["t5", 0], "positive": "a fox in the snow", "negative": "blurry"}},
        "zero": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 1]}},
        "range": {"class_type": "ConditioningSetTimestepRange", "inputs": {
            "conditioning": ["text", 0], "start": 0.0, "end": 1.0}},
        "empty": {"class_type": "EmptyMochiLatentVideo", "inputs": {
            "width": 64, "height": 48, "length": 13, "batch_size": 1}},
        "sampler": {"class_type": "Mochi1Sampler", "inputs": {
            "model": ["dit", 0], "positive": ["range", 0], "negative": ["zero", 0],
            "latent": ["empty", 0], "width": 848, "height": 480, "frames": 163, "steps": 2,
            "cfg": 4.5, "seed": 3, "denoise": 1.0, "threshold_noise": 0.025,
            "linear_steps": 0, "cfg_schedule": "", "batch_cfg": "auto"}},
        "vae": {"class_type": "Mochi1VAELoader", "inputs": {
            "vae_name": n["vae"], "second_file": "none", "dtype": "fp32"}},
        "decode_host_latent": {"class_type": "Mochi1VAEDecode", "inputs": {
            "decoder": ["vae", 0], "samples": ["empty", 0], "tile_size": 0,
            "tile_overlap": 64, "frame_chunk": 0}},
        "decode": {"class_type": "Mochi1VAEDecode", "inputs": {
            "decoder": ["vae", 0], "samples": ["sampler", 0], "tile_size": 0,
            "tile_overlap": 64, "frame_chunk": 1}},
        "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["decode", 0],
                                                         "image2": ["decode_host_latent", 0]}},
        "create": {"class_type": "CreateVideo", "inputs": {"images": ["batch", 0], "fps": 30}},
        "save": {"class_type": "SaveVideo", "inputs": {
            "video": ["create", 0], "filename_prefix": "Mochi1/interop", "format": "mp4",
            "codec": "h264"}},
    }
    entry = comfy.run(prompt, timeout=240)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    (result,) = saved_files(comfy, entry)["save"]
    info = read_video(result["path"])
    # The sampler took its size from the host's latent (64×48, 13 frames), not its widgets;
    # both decodes give 6T−5 = 13 frames.
    assert (info.width, info.height, info.frames) == (64, 48, 26)
