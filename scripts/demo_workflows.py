"""Demo copies of the bundled workflows, for a ComfyUI running on the demo checkpoint.

The bundled templates name the real Mochi 1 files (``mochi_preview_bf16.safetensors``, …), so on
the demo checkpoint (random weights, ``mochi_demo_*.safetensors``) every one of them stops at
the first Run. Placing the demo weights under the real names would make random weights pass
for the real model, so the launcher (``scripts/start_ui.py``) instead writes a copy of each
template into the user's workflow folder (``user/default/workflows``, listed in the frontend's
Workflows side bar) with:

* the demo file names in the loaders, and no ``properties.models`` (those offer the real files'
  downloads, which the demo copy does not use);
* the demo size (128×96, 25 frames, 8 steps, as the main job on the demo checkpoint);
* ``DEMO_random_weights_`` in front of every save node's file name, so that everything the demo
  makes is labelled in the output folder;
* the workflow's note titled and starting with a line saying so.

The templates themselves stay as they are. The native-interop workflow gets no copy: the host's
own CLIPLoader and VAELoader build full-size models, which the small demo files cannot fill.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

DEMO_SHAPE = {"width": 128, "height": 96, "frames": 25, "steps": 8}
#: Prefix of every file the demo writes (README: "labelled ``DEMO_random_weights_…``").
OUTPUT_LABEL = "DEMO_random_weights_"
COPY_PREFIX = "DEMO_"
NOTE = ("DEMO COPY for the demo checkpoint: RANDOM weights, so the video is noise, not a Mochi "
        "video. Files are saved as DEMO_random_weights_…; the size is reduced to 128×96, 25 "
        "frames, 8 steps. The real template (real Mochi 1 files): Templates (left side bar) → "
        "Extensions → mochi-nodes.\n\n")
NOTE_TITLE = "DEMO COPY: random weights"
LOADERS = {"Mochi1DiTLoader": ("dit_name", "dit"), "Mochi1TextEncoderLoader": ("t5_name", "t5"),
           "Mochi1VAELoader": ("vae_name", "vae")}  # fmt: skip
SAVERS = ("Mochi1SaveVideo", "SaveVideo")
#: Host loaders that build their own full-size models: a workflow using them has no demo copy.
FULL_SIZE_ONLY = ("CLIPLoader", "VAELoader")
#: Widgets followed in ``widgets_values`` by a "control after generate" value of their own.
CONTROLLED = ("seed",)
REAL_WIDTH = 848  # the templates' width; an ImageScale to more is the chain's 2x upscale


def widget_index(node: dict, name: str) -> int:
    """Position of widget ``name`` in a UI-format node's ``widgets_values``.

    The frontend saves the values in widget order (the node's inputs that carry a ``widget``),
    with the control value right after a seed.
    """
    index = 0
    for slot in node.get("inputs", []):
        widget = slot.get("widget", {}).get("name")
        if widget == name:
            return index
        if widget is not None:
            index += 2 if widget in CONTROLLED else 1
    raise KeyError(f"node {node.get('id')} ({node['type']}) has no widget {name!r}")


def _set(node: dict, name: str, value) -> None:
    node["widgets_values"][widget_index(node, name)] = value


def _get(node: dict, name: str):
    return node["widgets_values"][widget_index(node, name)]


def labelled_prefix(prefix: str) -> str:
    """``Mochi1/t2v`` → ``Mochi1/DEMO_random_weights_t2v`` (the folder kept)."""
    folder, _, name = prefix.rpartition("/")
    return f"{folder}/{OUTPUT_LABEL}{name}" if folder else OUTPUT_LABEL + name


def _demo_node(node: dict, files: dict[str, str], shape: dict) -> None:
    """Point one node at the demo files, the demo size and the labelled output names."""
    kind = node["type"]
    if kind in LOADERS:
        widget, role = LOADERS[kind]
        _set(node, widget, files[role])
        node.get("properties", {}).pop("models", None)
    elif kind == "Mochi1Sampler":
        for name in ("width", "height", "frames", "steps"):
            _set(node, name, shape[name])
    elif kind == "ImageScale":
        factor = 2 if _get(node, "width") > REAL_WIDTH else 1
        _set(node, "width", shape["width"] * factor)
        _set(node, "height", shape["height"] * factor)
    elif kind in SAVERS:
        _set(node, "filename_prefix", labelled_prefix(_get(node, "filename_prefix")))
    elif kind == "Note":
        node["title"] = NOTE_TITLE
        node["widgets_values"][0] = NOTE + node["widgets_values"][0]


def demo_workflow(workflow: dict, files: dict[str, str], shape: dict | None = None) -> dict | None:
    """The demo copy of a UI-format workflow, or None when it cannot run on the demo files.

    ``files``: the demo file name of each role (``dit``, ``vae``, ``t5``).
    """
    if any(n["type"] in FULL_SIZE_ONLY for n in workflow["nodes"]):
        return None
    out = copy.deepcopy(workflow)
    out["id"] = str(uuid.uuid4())  # a workflow of its own, not the template
    for node in out["nodes"]:
        _demo_node(node, files, {**DEMO_SHAPE, **(shape or {})})
    return out


def write_demo_workflows(base: Path, files: dict[str, str]) -> list[Path]:
    """Write ``DEMO_<template>.json`` into ``base/user/default/workflows``; return the paths.

    A copy already there is kept (it may hold the user's changes; delete it to refresh it).
    """
    folder = base / "user" / "default" / "workflows"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for template in sorted(WORKFLOWS.glob("*.json")):
        workflow = demo_workflow(json.loads(template.read_text()), files)
        if workflow is None:
            continue
        path = folder / f"{COPY_PREFIX}{template.name}"
        if not path.exists():
            path.write_text(json.dumps(workflow, indent=2) + "\n")
        written.append(path)
    return written
