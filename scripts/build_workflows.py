"""Build the bundled workflows in the real ComfyUI frontend and save them as the UI saves them.

Each graph below is created in headless Chromium through the frontend's public objects
(``LiteGraph.createNode``, ``app.graph``), serialized with ``app.graph.serialize()`` and written
to ``workflows/<name>.json`` with a same-name ``.jpg`` thumbnail for the templates browser.
The loader nodes carry ``properties.models`` (file name, download URL, model folder) so the
frontend's missing-models dialog can help users.

Each workflow's saved view (``extra.ds``) frames the whole graph in the part of a 1280×720
window that the frontend's own bars leave free, at a zoom where the frontend still draws node
text (it switches to blank boxes below 8 px text); the layouts below are compact enough for
that. The thumbnails are cards drawn for the templates browser's square tiles (about 270 px):
the title, the pipeline and the settings in type that stays legible there, instead of a
screenshot of the whole graph, whose text is a few pixels high at that size.

Usage: .venv/bin/python scripts/build_workflows.py
"""

from __future__ import annotations

import html
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


# Columns of the layouts (graph units): loaders, text, sampler, decode, saves; rows start at 60.
COL = (40, 380, 760, 1140, 1450, 1750)
SAVE_SIZE = [260, 250]


def _loaders(x: int = COL[0], y: int = 60) -> dict:
    return {
        "dit": {"type": "Mochi1DiTLoader", "pos": [x, y], "model": "dit",
                "widgets": {"dit_name": MODELS["dit"]["name"], "weight_dtype": "default",
                            "attention": "sdpa", "compile": "off"}},
        "t5": {"type": "Mochi1TextEncoderLoader", "pos": [x, y + 270], "model": "t5",
               "widgets": {"t5_name": MODELS["t5"]["name"], "dtype": "default"}},
        "vae": {"type": "Mochi1VAELoader", "pos": [x, y + 400], "model": "vae",
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
    spec = {"type": "Mochi1SaveVideo", "pos": pos, "size": SAVE_SIZE,
            "widgets": {"fps": 30.0, "format": fmt, "quality": 85, "filename_prefix": prefix}}
    if title:
        spec["title"] = title
    return spec


def text_to_video(frames: int, steps: int, prefix: str, note: str) -> dict:
    nodes = _loaders() | {
        "note": {"type": "Note", "pos": [COL[1], 60], "size": [340, 230],
                 "widgets": {"text": note}},
        "encode": {"type": "Mochi1TextEncode", "pos": [COL[1], 330], "size": [340, 256],
                   "widgets": {"positive": PROMPT, "negative": NEGATIVE}},
        "sampler": _sampler([COL[2], 60], frames, steps),
        "decode": _decode([COL[3], 60]),
        "save": _save([COL[3], 240], prefix),
    }
    links = [("t5", 0, "encode", "text_encoder"), ("dit", 0, "sampler", "model"),
             ("encode", 0, "sampler", "positive"), ("encode", 1, "sampler", "negative"),
             ("vae", 0, "decode", "decoder"), ("sampler", 0, "decode", "samples"),
             ("decode", 0, "save", "images")]
    return {"nodes": nodes, "links": links}


def native_interop() -> dict:
    nodes = {
        "dit": _loaders()["dit"],
        "clip": {"type": "CLIPLoader", "pos": [COL[0], 330], "model": "t5",
                 "widgets": {"clip_name": MODELS["t5"]["name"], "type": "mochi"}},
        "pos": {"type": "CLIPTextEncode", "pos": [COL[1], 60], "size": [340, 180],
                "title": "CLIP Text Encode (Positive)", "widgets": {"text": PROMPT}},
        "neg": {"type": "CLIPTextEncode", "pos": [COL[1], 290], "size": [340, 130],
                "title": "CLIP Text Encode (Negative)", "widgets": {"text": NEGATIVE}},
        "empty": {"type": "EmptyMochiLatentVideo", "pos": [COL[1], 470],
                  "widgets": {"width": 848, "height": 480, "length": 49, "batch_size": 1}},
        "sampler": _sampler([COL[2], 60], 49, 30),
        "vaeload": {"type": "VAELoader", "pos": [COL[3], 60], "model": "vae",
                    "widgets": {"vae_name": MODELS["vae"]["name"]}},
        "decode": {"type": "VAEDecodeTiled", "pos": [COL[3], 170],
                   "widgets": {"tile_size": 256, "overlap": 64, "temporal_size": 64,
                               "temporal_overlap": 8}},
        "create": {"type": "CreateVideo", "pos": [COL[3], 380], "widgets": {"fps": 30}},
        "save": {"type": "SaveVideo", "pos": [COL[4] + 40, 60], "size": [300, 300],
                 "widgets": {"filename_prefix": "Mochi1/native", "format": "mp4",
                             "codec": "h264"}},
        "note": {"type": "Note", "pos": [COL[0], 490], "size": [300, 190], "widgets": {"text": (
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
    graph["nodes"]["save"]["pos"] = [COL[4], 60]
    graph["nodes"] |= {
        "scale": {"type": "ImageScale", "pos": [COL[3], 240],
                  "widgets": {"upscale_method": "bilinear", "width": 1696, "height": 960,
                              "crop": "disabled"}},
        "canny": {"type": "Canny", "pos": [COL[3], 420],
                  "widgets": {"low_threshold": 0.2, "high_threshold": 0.5}},
        "save_scaled": _save([COL[4], 370], "Mochi1/chain_upscaled", title="Save upscaled"),
        "save_canny": _save([COL[5], 60], "Mochi1/chain_canny", "webp (animated)",
                            title="Save Canny edges"),
        "host_save": {"type": "SaveVideo", "pos": [COL[5], 370], "size": SAVE_SIZE,
                      "widgets": {"filename_prefix": "Mochi1/chain_host", "format": "mp4",
                                  "codec": "h264"}},
    }
    graph["links"] += [("decode", 0, "scale", "image"), ("decode", 0, "canny", "image"),
                       ("scale", 0, "save_scaled", "images"),
                       ("canny", 0, "save_canny", "images"), ("save", 1, "host_save", "video")]
    return graph


def video_to_video() -> dict:
    nodes = _loaders() | {
        "load": {"type": "LoadVideo", "pos": [COL[1], 60], "size": [300, 290],
                 "widgets": {"file": "mochi1_input.mp4"}},
        "components": {"type": "GetVideoComponents", "pos": [COL[1], 420]},
        "scale": {"type": "ImageScale", "pos": [COL[1], 530],
                  "widgets": {"upscale_method": "bilinear", "width": 848, "height": 480,
                              "crop": "center"}},
        "encode_text": {"type": "Mochi1TextEncode", "pos": [COL[2] - 40, 190], "size": [340, 200],
                        "widgets": {"positive": "The same scene as a watercolour painting, "
                                    "soft washes of colour, paper texture.",
                                    "negative": NEGATIVE}},
        "encode": {"type": "Mochi1VAEEncode", "pos": [COL[2] - 40, 60],
                   "widgets": {"frame_handling": "trim to 6k+1"}},
        "sampler": _sampler([COL[3] - 20, 60], 49, 30, denoise=0.6),
        "decode": _decode([COL[4] + 30, 60]),
        "save": _save([COL[4] + 30, 240], "Mochi1/v2v"),
        "note": {"type": "Note", "pos": [COL[2] - 40, 430], "size": [340, 210],
                 "widgets": {"text": (
            "Video-to-video: load a clip (the pack's workflows/mochi1_input.mp4 is a small test "
            "clip: copy it to ComfyUI/input, or upload your own with the button), "
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


# --------------------------------------------------------------------------------------------
# The saved view: the whole graph in a 1280×720 window, at a zoom that still draws node text

VIEW = (1280, 720)
#: The canvas area (left, top, right, bottom; CSS pixels) that a 1280×720 window leaves free of
#: the frontend's bars: the side bar, the tabs and the "Nodes 2.0" banner, the breadcrumb and the
#: run toolbar, the zoom controls (measured in comfyui-frontend-package 1.32.9).
VIEW_FREE = (72, 140, 1268, 650)
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its ``pos``
MARGIN = 12
#: Below this zoom the frontend draws nodes as blank boxes: its default level-of-detail threshold
#: is 8 px text, and node text is 14 px (``LiteGraph.NODE_TEXT_SIZE``); a little headroom kept.
MIN_SCALE = 8 / 14 + 0.02


def graph_bounds(workflow: dict) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of every node with its title bar, in graph units."""
    nodes = workflow["nodes"]
    return (min(n["pos"][0] for n in nodes), min(n["pos"][1] for n in nodes) - TITLE_HEIGHT,
            max(n["pos"][0] + n["size"][0] for n in nodes),
            max(n["pos"][1] + n["size"][1] for n in nodes))  # fmt: skip


def saved_view(workflow: dict) -> dict:
    """``extra.ds`` that centres the whole graph in :data:`VIEW_FREE` (never zooming in)."""
    x0, y0, x1, y1 = graph_bounds(workflow)
    x0, y0, x1, y1 = x0 - MARGIN, y0 - MARGIN, x1 + MARGIN, y1 + MARGIN
    left, top, right, bottom = VIEW_FREE
    scale = min(1.0, (right - left) / (x1 - x0), (bottom - top) / (y1 - y0))
    if scale < MIN_SCALE:
        raise ValueError(f"the graph ({x1 - x0:.0f}×{y1 - y0:.0f}) needs zoom {scale:.3f} to fit "
                         f"{VIEW[0]}×{VIEW[1]}; below {MIN_SCALE:.3f} the frontend hides node "
                         "text: make the layout more compact")
    screen_x = left + ((right - left) - (x1 - x0) * scale) / 2
    screen_y = top + ((bottom - top) - (y1 - y0) * scale) / 2
    return {"scale": round(scale, 4),
            "offset": [round(screen_x / scale - x0, 1), round(screen_y / scale - y0, 1)]}


# --------------------------------------------------------------------------------------------
# Thumbnails: cards legible in the templates browser's square tiles

#: Per workflow: the card's title, its pipeline and two lines of settings.
CARDS = {
    "mochi1_text_to_video": ("Text to video", ["T5 prompt", "Mochi 1 sampler", "VAE decode",
                                               "MP4"],
                             ["848×480 · 163 frames", "64 steps · CFG 6.0 (Genmo)"]),
    "mochi1_fast_preview": ("Fast preview", ["T5 prompt", "Mochi 1 sampler", "VAE decode", "MP4"],
                            ["848×480 · 49 frames", "30 steps: try prompts and seeds"]),
    "mochi1_native_interop": ("Native interop", ["CLIP Text Encode", "Mochi 1 sampler",
                                                  "VAE Decode (Tiled)", "Save Video"],
                              ["host loaders and decoder", "848×480 · 49 frames"]),
    "mochi1_chain_upscale_canny": ("Upscale + Canny", ["Mochi 1 video", "Image Scale ×2",
                                                       "Canny edges", "3 videos"],
                                   ["frames are plain IMAGEs", "848×480 · 49 frames"]),
    "mochi1_video_to_video": ("Video to video", ["Load Video", "VAE encode", "sample, denoise 0.6",
                                                 "VAE decode"],
                              ["input/mochi1_input.mp4", "keeps the clip's fps"]),
}
CARD_SIZE = 512
CARD_HTML = """<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 0; width: {size}px; height: {size}px; background: #1d2430; color: #f2f4f8;
       font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }}
.card {{ box-sizing: border-box; width: 100%; height: 100%; padding: 28px 34px;
        display: flex; flex-direction: column; gap: 13px; overflow: hidden; }}
.brand {{ font-size: 26px; color: #ffb454; font-weight: bold; letter-spacing: 1px; }}
h1 {{ margin: 0 0 6px 0; font-size: 46px; line-height: 1.05; }}
.step {{ font-size: 27px; background: #2f3a4d; border-left: 6px solid #5ccfe6;
        border-radius: 6px; padding: 6px 12px; }}
.arrow {{ font-size: 20px; color: #8a96a8; margin: -12px 0 -12px 24px; }}
.meta {{ margin-top: auto; font-size: 25px; color: #c9d1dc; line-height: 1.3; }}
</style></head><body><div class="card"><div class="brand">MOCHI 1</div><h1>{title}</h1>
{steps}<div class="meta">{meta}</div></div></body></html>"""


def card_html(name: str) -> str:
    """The thumbnail card of a workflow as a small HTML page."""
    title, steps, meta = CARDS[name]
    boxes = '\n<div class="arrow">▼</div>\n'.join(
        f'<div class="step">{html.escape(step)}</div>' for step in steps)
    return CARD_HTML.format(size=CARD_SIZE, title=html.escape(title), steps=boxes,
                            meta="<br>".join(html.escape(line) for line in meta))


def write_thumbnail(page, name: str, path: Path) -> None:
    """Render the card of ``name`` in Chromium and save it as a square JPEG."""
    page.set_viewport_size({"width": CARD_SIZE, "height": CARD_SIZE})
    page.set_content(card_html(name))
    page.screenshot(path=str(path), type="jpeg", quality=88,
                    clip={"x": 0, "y": 0, "width": CARD_SIZE, "height": CARD_SIZE})


def build(page, name: str, graph: dict) -> dict:
    for spec in graph["nodes"].values():
        if "model" in spec:
            spec["models"] = [MODELS[spec.pop("model")]]
    workflow = json.loads(page.evaluate(BUILD_JS, graph))
    workflow["extra"]["ds"] = saved_view(workflow)
    return workflow


def main() -> None:
    from tests.host.frontend import browser_page

    WORKFLOWS.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="mochi-workflows-"))
    server = None
    try:
        seed_base(base)
        server = start_server(base)
        with browser_page(server.url, viewport=VIEW) as page:
            for name, make in GRAPHS.items():
                workflow = build(page, name, make())
                (WORKFLOWS / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n")
                print(f"wrote workflows/{name}.json ({len(workflow['nodes'])} nodes, "
                      f"view zoom {workflow['extra']['ds']['scale']:.2f})")
            card_page = page.context.browser.new_page()  # a context of its own
            for name in GRAPHS:
                write_thumbnail(card_page, name, WORKFLOWS / f"{name}.jpg")
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
