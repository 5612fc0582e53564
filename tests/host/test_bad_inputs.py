"""The bad-input matrix of issue 5 item 1, through POST /prompt on the real server.

Every bad value is refused with HTTP 400 naming the input (and the allowed values), or ends in
a clear ``execution_error`` before sampling; no output file appears; valid boundary values and
odd-but-valid text run; and the server then runs a valid prompt. The cases of
``test_errors.py`` are not repeated here. Besides the hand-written table, every numeric, text
and choice input of every pack node is tried out of range, generated from the node
definitions the server publishes (``/object_info``), so a new input cannot escape the checks.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.host.test_errors import base_prompt, pack_crashes, refused

pytestmark = pytest.mark.host

# (node, input, value, words the refusal must contain besides the input's name)
REFUSED = [
    ("sampler", "frames", 0, ["7"]),
    ("sampler", "frames", 1, ["6k+1", "7"]),
    ("sampler", "frames", 2, ["6k+1", "7"]),
    ("sampler", "frames", 8, ["6k+1", "7 or 13"]),
    ("sampler", "frames", 164, ["6k+1", "163 or 169"]),
    ("sampler", "frames", 100_000, ["361"]),
    ("sampler", "width", 0, ["16"]),
    ("sampler", "width", 100, ["multiple of 16", "nearest valid: 96"]),
    ("sampler", "height", 470, ["multiple of 16", "nearest valid: 464"]),
    ("sampler", "width", 1_000_000, ["4096"]),
    ("sampler", "height", -16, ["16"]),
    ("sampler", "steps", 0, ["1"]),
    ("sampler", "steps", 1001, ["1000"]),
    ("sampler", "cfg", -1.0, ["0"]),
    ("sampler", "cfg", 31.0, ["30"]),
    ("sampler", "seed", 2**64, ["18446744073709551615"]),
    ("sampler", "seed", -1, ["0"]),
    ("sampler", "denoise", 0.0, ["0.01"]),
    ("sampler", "threshold_noise", 1.0, ["0.999"]),
    ("sampler", "width", "wide", []),
    ("sampler", "steps", "ten", []),
    ("sampler", "cfg", "high", []),
    ("sampler", "cfg_schedule", "6, 45", ["between 0 and 30"]),
    ("sampler", "width", 10**400, ["16", "4096"]),
    ("sampler", "height", -10**400, ["16", "4096"]),
    ("sampler", "linear_steps", -1, ["0", "1000"]),
    ("sampler", "cfg", math.nan, ["finite", "30"]),
    ("sampler", "cfg_schedule", "6, " * 47_000, ["at most", "characters"]),
    ("text", "positive", "x" * 20_001, ["20,000"]),
    ("text", "negative", "fox \ud800 snow", ["Unicode", "surrogate"]),
    ("text", "positive", "fox\x00snow", ["NUL"]),
    ("t5", "dtype", "fp16", ["fp32", "bf16"]),
    ("vae", "dtype", "fp64", ["fp32", "bf16", "fp16"]),
    ("vae", "second_file", "missing_encoder.safetensors", ["'vae' model folder"]),
    ("dit", "lora_2", "missing.safetensors", ["loras"]),
    ("dit", "lora_1_strength", 5.0, ["4.0"]),
    ("decode", "tile_size", 48, ["multiple of 16 from 64"]),
    ("decode", "frame_chunk", 65, ["64"]),
    ("save", "quality", 0, ["1"]),
    ("save", "fps", 61.0, ["60"]),
    ("save", "filename_prefix", "Mochi1/a\x00b", ["NUL"]),
    ("save", "filename_prefix", "p" * 10_000, ["at most 200"]),
    ("save", "filename_prefix", "Mochi1/../../../etc/x", ["inside the output folder"]),
]


def output_files(comfy) -> set[str]:
    return {str(p.relative_to(comfy.output_dir)) for p in comfy.output_dir.rglob("*")
            if p.is_file()}


def assert_refused_cleanly(comfy, prompt: dict, node: str) -> str:
    """HTTP 400 for ``node``; nothing queued, no history entry, no file written."""
    files, history = output_files(comfy), comfy.get("/history").keys()
    text = refused(comfy, prompt, node)
    assert comfy.get("/queue")["queue_pending"] == [] and comfy.get("/history").keys() == history
    assert output_files(comfy) == files
    return text


@pytest.mark.parametrize(("node", "field", "value", "words"), REFUSED,
                         ids=[f"{n}.{f}={str(v)[:12]!r}" for n, f, v, _ in REFUSED])
def test_bad_value_is_refused_naming_the_input(comfy, node, field, value, words):
    prompt = base_prompt(comfy.demo_files)
    prompt[node]["inputs"][field] = value
    text = assert_refused_cleanly(comfy, prompt, node)
    for word in [field, *words]:
        assert word in text, f"{word!r} not in {text[:400]!r}"


def _encoder_into_decoder(p: dict) -> str:
    p["decode"]["inputs"]["decoder"] = ["vae", 1]
    return "decode"


def _model_into_text_encoder(p: dict) -> str:
    p["text"]["inputs"]["text_encoder"] = ["dit", 0]
    return "text"


def _link_to_a_missing_node(p: dict) -> str:
    p["decode"]["inputs"]["samples"] = ["nowhere", 0]
    return "decode"


def _missing_required_input(p: dict) -> str:
    del p["sampler"]["inputs"]["steps"]
    return "sampler"


def _output_index_out_of_range(p: dict) -> str:
    p["sampler"]["inputs"]["negative"] = ["text", 5]
    return "sampler"


@pytest.mark.parametrize("rewire", [_encoder_into_decoder, _model_into_text_encoder,
                                    _link_to_a_missing_node, _missing_required_input,
                                    _output_index_out_of_range])
def test_bad_wiring_is_refused(comfy, rewire):
    prompt = base_prompt(comfy.demo_files)
    node = rewire(prompt)
    status, body = comfy.queue(prompt)
    assert status == 400, body
    assert not pack_crashes(body), json.dumps(pack_crashes(body))[:2000]
    if node in body.get("node_errors", {}):
        assert_refused_cleanly(comfy, prompt, node)
    else:  # a dangling link is refused for the whole prompt
        assert body["error"]["type"] in ("invalid_prompt", "prompt_outputs_failed_validation")


def _lora_for_another_model(comfy, name: str, sd: dict) -> str:
    save_file(sd, comfy.base / "models" / "loras" / name)
    return name


@pytest.mark.parametrize(("kind", "words"), [
    ("sd_keys", ["not a Genmo-format Mochi LoRA"]),
    ("wrong_shape", ["does not fit this model", "wrong shapes"]),
])
def test_a_lora_for_another_model_fails_in_the_loader_before_sampling(comfy, kind, words):
    g = torch.Generator().manual_seed(1)
    if kind == "sd_keys":
        sd = {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 320,
                                                                                  generator=g),
              "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.randn(320, 4,
                                                                                generator=g)}
    else:
        sd = {"blocks.0.attn.qkv_x.lora_A": torch.randn(4, 3072, generator=g),
              "blocks.0.attn.qkv_x.lora_B": torch.randn(9216, 4, generator=g)}
    name = _lora_for_another_model(comfy, f"other_model_{kind}.safetensors", sd)
    prompt = base_prompt(comfy.demo_files, seed=31)
    prompt["dit"]["inputs"]["lora_1"] = name
    prompt["save"]["inputs"]["filename_prefix"] = f"Mochi1/lora_{kind}"
    files = output_files(comfy)
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "Mochi1DiTLoader", error["node_type"]
    for word in [name, *words]:
        assert word in error["exception_message"], error["exception_message"]
    assert error["node_id"] == "dit" and output_files(comfy) == files


def latent_only(comfy, prefix: str, **sampler) -> dict:
    prompt = base_prompt(comfy.demo_files, steps=1, **sampler)
    for node in ("vae", "decode", "save"):
        del prompt[node]
    prompt["keep"] = {"class_type": "SaveLatent", "inputs": {
        "samples": ["sampler", 0], "filename_prefix": prefix}}
    return prompt


@pytest.mark.parametrize(("case", "sampler", "text"), [
    ("frames_7", {"frames": 7}, {}),
    ("frames_163", {"frames": 163}, {}),
    ("seed_max", {"seed": 2**64 - 1}, {}),
    ("empty_prompts", {}, {"positive": "", "negative": ""}),
    ("control_chars", {}, {"positive": "\x07\x1b[31mfox\t\r\n\u200b", "negative": "\x7f"}),
    ("long_unicode", {}, {"positive": "🦊 雪の中の狐, " * 1000, "negative": "é" * 20_000}),
])
def test_boundary_and_odd_but_valid_values_run(comfy, case, sampler, text):
    prompt = latent_only(comfy, f"latents/boundary_{case}", **sampler)
    prompt["text"]["inputs"].update(text)
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (item,) = entry["outputs"]["keep"]["latents"]
    z = load_file(comfy.output_dir / item["subfolder"] / item["filename"])["latent_tensor"]
    frames = sampler.get("frames", 13)
    assert z.shape == (1, 12, (frames - 1) // 6 + 1, 6, 8) and torch.isfinite(z).all()


def test_the_server_then_runs_a_valid_prompt(comfy):
    prompt = base_prompt(comfy.demo_files, seed=99)
    prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/after_bad_inputs"
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (video,) = entry["outputs"]["save"]["mochi_video"]
    assert (comfy.output_dir / video["subfolder"] / video["filename"]).stat().st_size > 0
    assert video["frames"] == 13


def test_the_sd_lora_fixture_really_is_foreign(comfy):
    """Sanity of the case above: the demo DiT has no module with the foreign LoRA's names."""
    dit = load_file(comfy.base / "models" / "diffusion_models" / comfy.demo_files["dit"])
    assert not any("lora_unet" in k or "down_blocks" in k for k in dit)
    assert dit["blocks.0.attn.qkv_x.weight"].shape != (9216, 3072)


# ---------------------------------------------------------------------------------------------
# Generated from the node definitions: every input of every pack node, out of its range
# ---------------------------------------------------------------------------------------------

#: Where each pack node sits in the test prompt (the tiling and encode nodes are added to it).
PROMPT_NODE = {"Mochi1DiTLoader": "dit", "Mochi1TextEncoderLoader": "t5",
               "Mochi1TextEncode": "text", "Mochi1Sampler": "sampler", "Mochi1DiTTiling": "tiling",
               "Mochi1VAELoader": "vae", "Mochi1VAEDecode": "decode", "Mochi1VAEEncode": "encode",
               "Mochi1SaveVideo": "save"}
LONG_TEXT = 140_000  # characters; the cfg_schedule was 140 KB


def full_prompt(comfy) -> dict:
    """The base prompt with a tiling node in the sampler, and its video encoded, sampled again
    and decoded again before the save node: every pack node lies on the one output's path."""
    prompt = base_prompt(comfy.demo_files)
    prompt["tiling"] = {"class_type": "Mochi1DiTTiling", "inputs": {
        "tile_size": 512, "tile_overlap": 128, "temporal_window": 0, "temporal_overlap": 2,
        "rope": "canvas"}}
    prompt["sampler"]["inputs"]["tiling"] = ["tiling", 0]
    prompt["encode"] = {"class_type": "Mochi1VAEEncode", "inputs": {
        "encoder": ["vae", 1], "images": ["decode", 0], "frame_handling": "trim to 6k+1"}}
    prompt["resample"] = copy.deepcopy(prompt["sampler"])
    prompt["resample"]["inputs"]["latent"] = ["encode", 0]
    prompt["redecode"] = copy.deepcopy(prompt["decode"])
    prompt["redecode"]["inputs"]["samples"] = ["resample", 0]
    prompt["save"]["inputs"]["images"] = ["redecode", 0]
    return prompt


def out_of_range(kind: str, spec: dict) -> list:
    """Values outside ``[min, max]`` of an INT or FLOAT input, huge ones and (floats) NaN/inf."""
    low, high = spec["min"], spec["max"]
    if kind == "INT":
        return [low - 1, high + 1, 10**400, -10**400]
    return [low - 1.0, high + 1.0, math.nan, math.inf, -math.inf]


def bad_values(definition: dict) -> list[tuple[str, object, list[str]]]:
    """``(input, bad value, words the refusal must contain)`` for every widget input."""
    cases = []
    for section in ("required", "optional"):
        for name, (kind, *rest) in definition["input"].get(section, {}).items():
            spec = rest[0] if rest else {}
            if kind in ("INT", "FLOAT"):
                limits = [str(spec["min"]), str(spec["max"])]
                cases += [(name, value, limits) for value in out_of_range(kind, spec)]
            elif kind == "STRING":
                cases.append((name, "6," * (LONG_TEXT // 2), ["at most", "characters"]))
            elif kind == "COMBO":
                options = [str(o) for o in spec["options"]]
                shown = [o for o in options if o != "none"][:1]  # the message lists the choices
                cases.append((name, "no such option", shown))
    return cases


def test_every_pack_node_is_in_the_generated_matrix(comfy):
    pack = {name for name in comfy.get("/object_info") if name.startswith("Mochi1")}
    assert pack == set(PROMPT_NODE)


@pytest.mark.parametrize("class_type", sorted(PROMPT_NODE))
def test_every_input_out_of_range_is_refused_by_the_node(comfy, class_type):
    """Each numeric input below its min, above its max, as ±10**400 and (floats) NaN/±inf,
    each text input at 140 KB and each choice not among its options: HTTP 400 naming the input
    and its limits, no traceback, nothing queued or written."""
    definition = comfy.get(f"/object_info/{class_type}")[class_type]
    node, failures = PROMPT_NODE[class_type], []
    cases = bad_values(definition)
    assert cases or class_type == "Mochi1VAEEncode"
    for field, value, words in cases:
        prompt = full_prompt(comfy)
        prompt[node]["inputs"][field] = value
        problem = refusal_problem(comfy, prompt, node, [field, *words])
        if problem:
            failures.append(f"{field}={str(value)[:20]}: {problem}")
    assert not failures, "\n".join(failures)


def refusal_problem(comfy, prompt: dict, node: str, words: list[str]) -> str | None:
    """What is wrong with the refusal of ``prompt`` (None when it is refused cleanly by
    ``node`` with every word); an accepted prompt is waited for, so the next case starts
    with an empty queue."""
    status, body = comfy.queue(prompt)
    if status == 200:
        comfy.wait(body["prompt_id"])
        return "accepted"
    try:
        text = assert_refused_cleanly(comfy, prompt, node)
    except AssertionError as err:
        return str(err)[:300]
    missing = [w for w in words if w not in text]
    return f"{missing} not in {text[:300]!r}" if missing else None


@pytest.mark.parametrize("class_type", sorted(PROMPT_NODE))
def test_a_missing_widget_input_is_named_without_a_crash(comfy, class_type):
    """The host reports a required input left out of a prompt; the node's validate_inputs,
    called with the inputs that are there, must not crash with a traceback."""
    definition = comfy.get(f"/object_info/{class_type}")[class_type]
    node, failures = PROMPT_NODE[class_type], []
    widgets = [name for name, (kind, *_) in definition["input"]["required"].items()
               if kind in ("INT", "FLOAT", "STRING", "COMBO")]
    for field in widgets:
        prompt = full_prompt(comfy)
        del prompt[node]["inputs"][field]
        status, body = comfy.queue(prompt)
        errors = body.get("node_errors", {}).get(node, {}).get("errors", []) if status == 400 \
            else []
        named = [e for e in errors if e["type"] == "required_input_missing"
                 and e["extra_info"]["input_name"] == field]
        if status != 400 or not named or pack_crashes(body):
            failures.append(f"{field}: HTTP {status}, {json.dumps(body)[:400]}")
            if status == 200:
                comfy.wait(body["prompt_id"])
    assert widgets and not failures, "\n".join(failures)
