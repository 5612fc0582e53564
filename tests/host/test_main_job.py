"""The main job's choice of weights (real files from a ComfyUI models folder, never demo ones)
and its prompt. No server needed."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from scripts.run_main_job import build_prompt, find_real_models, link_models


def _copy(src: Path, dst: Path, metadata: dict | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(src), dst, metadata=metadata)


def test_real_files_are_found_and_demo_files_refused(tmp_path):
    from mochi_core.demo import DEMO_TAG, make_demo_checkpoints

    demo = make_demo_checkpoints(tmp_path / "demo", seed=0)
    models = tmp_path / "models"
    # The demo files under the names users download: refused (they carry the demo tag).
    _copy(demo.dit, models / "diffusion_models" / "mochi_preview_bf16.safetensors",
          {DEMO_TAG: "random"})
    _copy(demo.vae, models / "vae" / "mochi_vae.safetensors")
    _copy(demo.t5, models / "clip" / "t5xxl_fp8_e4m3fn.safetensors")
    assert find_real_models(models) is None
    assert find_real_models(tmp_path / "nowhere") is None
    # Untagged files in the native workflow's folders (clip/ is ComfyUI's older name).
    _copy(demo.dit, models / "diffusion_models" / "mochi_preview_bf16.safetensors")
    found = find_real_models(models)
    assert {k: p.name for k, p in found.items()} == {
        "dit": "mochi_preview_bf16.safetensors", "vae": "mochi_vae.safetensors",
        "t5": "t5xxl_fp8_e4m3fn.safetensors"}

    base = tmp_path / "base"
    names = link_models(base, found)
    assert (base / "models" / "text_encoders" / names["t5"]).resolve() == found["t5"].resolve()


def test_the_main_job_prompt_keeps_the_reference_settings_on_real_weights():
    object_info = {  # only what ui_to_api reads: the widget inputs of each node type
        kind: {"input": {"required": {name: ["X", extra] for name, extra in widgets.items()}}}
        for kind, widgets in {
            "Mochi1DiTLoader": {n: {} for n in ("dit_name", "weight_dtype", "attention",
                                                "compile", "lora_1", "lora_1_strength",
                                                "lora_2", "lora_2_strength")},
            "Mochi1TextEncoderLoader": {"t5_name": {}, "dtype": {}},
            "Mochi1VAELoader": {"vae_name": {}, "second_file": {}, "dtype": {}},
            "Mochi1TextEncode": {"positive": {}, "negative": {}},
            "Mochi1Sampler": {**{n: {} for n in ("width", "height", "frames", "steps", "cfg")},
                              "seed": {"control_after_generate": True},
                              **{n: {} for n in ("denoise", "threshold_noise", "linear_steps",
                                                 "cfg_schedule", "batch_cfg")}},
            "Mochi1VAEDecode": {n: {} for n in ("tile_size", "tile_overlap", "frame_chunk")},
            "Mochi1SaveVideo": {n: {} for n in ("fps", "format", "quality", "filename_prefix")},
        }.items()}
    files = {"dit": "mochi_preview_bf16.safetensors", "vae": "mochi_vae.safetensors",
             "t5": "t5xxl_fp16.safetensors"}
    prompt = build_prompt(object_info, files, demo=False, text="a boat", seed=5)
    nodes = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert {k: nodes["Mochi1Sampler"][k] for k in ("width", "height", "frames", "steps", "cfg",
                                                   "seed")} == {
        "width": 848, "height": 480, "frames": 163, "steps": 64, "cfg": 6.0, "seed": 5}
    assert nodes["Mochi1TextEncode"]["positive"] == "a boat"
    demo = build_prompt(object_info, files, demo=True, text=None, seed=None)
    sampler = next(n["inputs"] for n in demo.values() if n["class_type"] == "Mochi1Sampler")
    assert (sampler["width"], sampler["frames"]) == (128, 25)
    save = next(n["inputs"] for n in demo.values() if n["class_type"] == "Mochi1SaveVideo")
    assert "DEMO" in save["filename_prefix"]
