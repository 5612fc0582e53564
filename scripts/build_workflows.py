"""Build the bundled workflows in the real ComfyUI frontend and save them as the UI saves them.

Each graph below is created in headless Chromium through the frontend's public objects
(``LiteGraph.createNode``, ``app.graph``), serialized with ``app.graph.serialize()`` and written
to ``workflows/<name>.json`` with a same-name ``.jpg`` thumbnail for the templates browser.
The loader nodes carry ``properties.models`` (file name, download URL, model folder) so the
frontend's missing-models dialog can help users.

Usage: .venv/bin/python scripts/build_workflows.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.comfy_server import seed_base, start_server, stop_server  # noqa: E402

WORKFLOWS = ROOT / "workflows"

HF = "https://huggingface.co"
MODELS = {
    "dit": {"name": "mochi_preview_bf16.safetensors", "directory": "diffusion_models",
            "url": f"{HF}/Comfy-Org/mochi_preview_repackaged/resolve/main/split_files/"
                   "diffusion_models/mochi_preview_bf16.safetensors"},
    "vae": {"name": "mochi_vae.safetensors", "directory": "vae",
            "url": f"{HF}/Comfy-Org/mochi_preview_repackaged/resolve/main/split_files/vae/"
                   "mochi_vae.safetensors"},
    "t5": {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
           "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"},
}
PROMPT = ("A red fox trots through fresh snow in a birch forest at sunrise, its breath visible "
          "in the cold air. Soft golden light, shallow depth of field, cinematic, 35mm film.")
NEGATIVE = ""
SEED = 1710977262  # Genmo's CLI default

T2V_NOTE = (
    "Mochi 1 text-to-video at the reference settings: 848×480, 163 frames (5.4 s at 30 fps), "
    "64 steps, CFG 6.0 as in Genmo's CLI and gradio demo. diffusers and some other "
    "workflows use CFG 4.5: a little less contrast and prompt adherence, sometimes steadier "
    "motion. Try both.\n\n"
    "Files (the same as the native ComfyUI Mochi workflow):\n"
    "- models/diffusion_models/mochi_preview_bf16.safetensors\n"
    "- models/vae/mochi_vae.safetensors\n"
    "- models/text_encoders/t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)\n\n"
    "Out of memory: set weight_dtype to fp8_e4m3fn, lower frame_chunk / set tile_size on the "
    "decoder, or start ComfyUI with --lowvram."
)


def _loaders(x: int = 40, y: int = 60) -> dict:
    return {
        "dit": {"type": "Mochi1DiTLoader", "pos": [x, y], "model": "dit",
                "widgets": {"dit_name": MODELS["dit"]["name"], "weight_dtype": "default",
                            "attention": "sdpa", "compile": "off"}},
        "t5": {"type": "Mochi1TextEncoderLoader", "pos": [x, y + 330], "model": "t5",
               "widgets": {"t5_name": MODELS["t5"]["name"], "dtype": "default"}},
        "vae": {"type": "Mochi1VAELoader", "pos": [x, y + 500], "model": "vae",
                "widgets": {"vae_name": MODELS["vae"]["name"], "second_file": "none",
                            "dtype": "fp32"}},
    }


def _sampler(pos, frames: int, steps: int, denoise: float = 1.0, prefix="") -> dict:
    return {"type": "Mochi1Sampler", "pos": pos, "size": [340, 470],
            "widgets": {"width": 848, "height": 480, "frames": frames, "steps": steps,
                        "cfg": 6.0, "seed": SEED, "control_after_generate": "fixed",
                        "denoise": denoise}}


def _decode(pos) -> dict:
    return {"type": "Mochi1VAEDecode", "pos": pos,
            "widgets": {"tile_size": 0, "tile_overlap": 64, "frame_chunk": 4}}


def _save(pos, prefix: str, fmt: str = "mp4 (H.264)", title: str | None = None) -> dict:
    spec = {"type": "Mochi1SaveVideo", "pos": pos, "size": [360, 420],
            "widgets": {"fps": 30.0, "format": fmt, "quality": 85, "filename_prefix": prefix}}
    if title:
        spec["title"] = title
    return spec


def text_to_video(frames: int, steps: int, prefix: str, note: str) -> dict:
    nodes = _loaders() | {
        "note": {"type": "Note", "pos": [430, 60], "size": [400, 300],
                 "widgets": {"text": note}},
        "encode": {"type": "Mochi1TextEncode", "pos": [430, 390], "size": [400, 260],
                   "widgets": {"positive": PROMPT, "negative": NEGATIVE}},
        "sampler": _sampler([870, 60], frames, steps),
        "decode": _decode([1250, 60]),
        "save": _save([1580, 60], prefix),
    }
    links = [("t5", 0, "encode", "text_encoder"), ("dit", 0, "sampler", "model"),
             ("encode", 0, "sampler", "positive"), ("encode", 1, "sampler", "negative"),
             ("vae", 0, "decode", "decoder"), ("sampler", 0, "decode", "samples"),
             ("decode", 0, "save", "images")]
    return {"nodes": nodes, "links": links}


def native_interop() -> dict:
    nodes = {
        "dit": _loaders()["dit"],
        "clip": {"type": "CLIPLoader", "pos": [40, 330], "model": "t5",
                 "widgets": {"clip_name": MODELS["t5"]["name"], "type": "mochi"}},
        "pos": {"type": "CLIPTextEncode", "pos": [430, 60], "size": [400, 200],
                "title": "CLIP Text Encode (Positive)", "widgets": {"text": PROMPT}},
        "neg": {"type": "CLIPTextEncode", "pos": [430, 300], "size": [400, 160],
                "title": "CLIP Text Encode (Negative)", "widgets": {"text": NEGATIVE}},
        "empty": {"type": "EmptyMochiLatentVideo", "pos": [430, 500],
                  "widgets": {"width": 848, "height": 480, "length": 49, "batch_size": 1}},
        "sampler": _sampler([870, 60], 49, 30),
        "vaeload": {"type": "VAELoader", "pos": [870, 580], "model": "vae",
                    "widgets": {"vae_name": MODELS["vae"]["name"]}},
        "decode": {"type": "VAEDecodeTiled", "pos": [1250, 60],
                   "widgets": {"tile_size": 256, "overlap": 64, "temporal_size": 64,
                               "temporal_overlap": 8}},
        "create": {"type": "CreateVideo", "pos": [1250, 330], "widgets": {"fps": 30}},
        "save": {"type": "SaveVideo", "pos": [1580, 60], "size": [360, 420],
                 "widgets": {"filename_prefix": "Mochi1/native", "format": "mp4",
                             "codec": "h264"}},
        "note": {"type": "Note", "pos": [40, 560], "size": [380, 200], "widgets": {"text": (
            "Native interop: the host's CLIPLoader(type=mochi) + CLIPTextEncode and "
            "EmptyMochiLatentVideo feed the Mochi 1 Sampler; its LATENT (the host's "
            "convention) is decoded by the host's own VAELoader + VAE Decode (Tiled) and "
            "saved by the host's Save Video. Same files as the native Mochi workflow.")}},
    }
    links = [("dit", 0, "sampler", "model"), ("clip", 0, "pos", "clip"),
             ("clip", 0, "neg", "clip"), ("pos", 0, "sampler", "positive"),
             ("neg", 0, "sampler", "negative"), ("empty", 0, "sampler", "latent"),
             ("sampler", 0, "decode", "samples"), ("vaeload", 0, "decode", "vae"),
             ("decode", 0, "create", "images"), ("create", 0, "save", "video")]
    return {"nodes": nodes, "links": links}


def chaining() -> dict:
    graph = text_to_video(49, 30, "Mochi1/chain_original", (
        "Chaining: the decoded frames are ordinary IMAGE frames. They go through the host's "
        "ImageScale (swap in ImageUpscaleWithModel for a model upscaler) and Canny (a "
        "ControlNet preprocessor), each saved as a video; the save node's VIDEO output "
        "continues into the host's Save Video."))
    graph["nodes"] |= {
        "scale": {"type": "ImageScale", "pos": [1580, 520],
                  "widgets": {"upscale_method": "bilinear", "width": 1696, "height": 960,
                              "crop": "disabled"}},
        "canny": {"type": "Canny", "pos": [1580, 720],
                  "widgets": {"low_threshold": 0.2, "high_threshold": 0.5}},
        "save_scaled": _save([1980, 60], "Mochi1/chain_upscaled", title="Save upscaled"),
        "save_canny": _save([1980, 520], "Mochi1/chain_canny", "webp (animated)",
                            title="Save Canny edges"),
        "host_save": {"type": "SaveVideo", "pos": [2380, 60], "size": [360, 420],
                      "widgets": {"filename_prefix": "Mochi1/chain_host", "format": "mp4",
                                  "codec": "h264"}},
    }
    graph["links"] += [("decode", 0, "scale", "image"), ("decode", 0, "canny", "image"),
                       ("scale", 0, "save_scaled", "images"),
                       ("canny", 0, "save_canny", "images"), ("save", 1, "host_save", "video")]
    return graph


def video_to_video() -> dict:
    nodes = _loaders() | {
        "load": {"type": "LoadVideo", "pos": [430, 60], "size": [340, 420],
                 "widgets": {"file": "mochi1_input.mp4"}},
        "components": {"type": "GetVideoComponents", "pos": [430, 560]},
        "scale": {"type": "ImageScale", "pos": [430, 690],
                  "widgets": {"upscale_method": "bilinear", "width": 848, "height": 480,
                              "crop": "center"}},
        "encode_text": {"type": "Mochi1TextEncode", "pos": [820, 560], "size": [400, 240],
                        "widgets": {"positive": "The same scene as a watercolour painting, "
                                    "soft washes of colour, paper texture.",
                                    "negative": NEGATIVE}},
        "encode": {"type": "Mochi1VAEEncode", "pos": [820, 60],
                   "widgets": {"frame_handling": "trim to 6k+1"}},
        "sampler": _sampler([1250, 60], 49, 30, denoise=0.6),
        "decode": _decode([1630, 60]),
        "save": _save([1960, 60], "Mochi1/v2v"),
        "note": {"type": "Note", "pos": [820, 220], "size": [400, 280], "widgets": {"text": (
            "Video-to-video: load a clip (put it in ComfyUI/input or use the upload button), "
            "resize it to multiples of 16, encode it (frames are trimmed to 6k+1), sample with "
            "denoise < 1 (0.6 keeps the layout and motion, lower keeps more), decode, save at "
            "the clip's own frame rate. The sampler's size comes from the latent.")}},
    }
    links = [("load", 0, "components", "video"), ("components", 0, "scale", "image"),
             ("scale", 0, "encode", "images"), ("vae", 1, "encode", "encoder"),
             ("t5", 0, "encode_text", "text_encoder"), ("dit", 0, "sampler", "model"),
             ("encode_text", 0, "sampler", "positive"),
             ("encode_text", 1, "sampler", "negative"), ("encode", 0, "sampler", "latent"),
             ("vae", 0, "decode", "decoder"), ("sampler", 0, "decode", "samples"),
             ("decode", 0, "save", "images"), ("components", 2, "save", "fps")]
    return {"nodes": nodes, "links": links}


GRAPHS = {
    "mochi1_text_to_video": lambda: text_to_video(163, 64, "Mochi1/t2v", T2V_NOTE),
    "mochi1_fast_preview": lambda: text_to_video(49, 30, "Mochi1/preview", (
        "Fast preview: 49 frames (1.6 s) and 30 steps, about 4x quicker than the reference "
        "settings; check a prompt and a seed here, then run Mochi 1 text-to-video with the "
        "same seed.\n\n" + T2V_NOTE.split("\n\n", 1)[1])),
    "mochi1_native_interop": native_interop,
    "mochi1_chain_upscale_canny": chaining,
    "mochi1_video_to_video": video_to_video,
}

BUILD_JS = """
async ({nodes, links}) => {
  app.graph.clear();
  const made = {};
  for (const [key, spec] of Object.entries(nodes)) {
    const node = LiteGraph.createNode(spec.type);
    if (!node) throw new Error(`unknown node type ${spec.type}`);
    node.pos = spec.pos;
    app.graph.add(node);
    if (spec.title) node.title = spec.title;
    for (const [name, value] of Object.entries(spec.widgets || {})) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${spec.type} has no widget ${name}`);
      widget.value = value;
      widget.callback?.(value);
    }
    if (spec.size) node.setSize(spec.size);
    if (spec.models) node.properties.models = spec.models;
    made[key] = node;
  }
  for (const [from, slot, to, input] of links) {
    const target = made[to];
    const index = target.inputs.findIndex((i) => i.name === input);
    if (index < 0) throw new Error(`${target.type} has no input ${input}`);
    if (!made[from].connect(slot, target, index)) {
      throw new Error(`cannot link ${from} -> ${to}.${input}`);
    }
  }
  return JSON.stringify(app.graph.serialize());  // drops undefined fields, as saving does
}
"""


FIT_JS = """
([left, top]) => {
  const nodes = app.graph._nodes;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 20;
  const y0 = Math.min(...nodes.map((n) => n.pos[1])) - 50;
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
  const el = app.canvas.canvas;
  const w = el.clientWidth - left, h = el.clientHeight - top;
  const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [left / scale - x0, top / scale - y0];
  app.canvas.setDirty(true, true);
}
"""
THUMB_MARGIN = (64, 132)  # the frontend's side bar, top bar and floating toolbars


def fit_and_capture(page, path: Path) -> None:
    """Fit the whole graph into the canvas and save a screenshot of it (without the chrome)."""
    page.evaluate(FIT_JS, [THUMB_MARGIN[0] + 16, THUMB_MARGIN[1] + 8])
    page.wait_for_timeout(600)
    size = page.viewport_size
    clip = {"x": THUMB_MARGIN[0], "y": THUMB_MARGIN[1], "width": size["width"] - THUMB_MARGIN[0],
            "height": size["height"] - THUMB_MARGIN[1]}
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    page.screenshot(path=str(path), clip=clip, type=kind, **({"quality": 85} if kind == "jpeg"
                                                             else {}))


def build(page, name: str, graph: dict) -> dict:
    for spec in graph["nodes"].values():
        if "model" in spec:
            spec["models"] = [MODELS[spec.pop("model")]]
    workflow = json.loads(page.evaluate(BUILD_JS, graph))
    fit_and_capture(page, WORKFLOWS / f"{name}.jpg")
    return workflow


def main() -> None:
    from tests.host.frontend import browser_page

    WORKFLOWS.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="mochi-workflows-"))
    server = None
    try:
        seed_base(base)
        server = start_server(base)
        with browser_page(server.url, viewport=(1400, 820)) as page:
            for name, make in GRAPHS.items():
                workflow = build(page, name, make())
                (WORKFLOWS / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n")
                print(f"wrote workflows/{name}.json ({len(workflow['nodes'])} nodes)")
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
