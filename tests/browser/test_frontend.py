"""The ComfyUI frontend in headless Chromium: bundled workflows load with every node type known,
our extension is registered and helps with Mochi's shape rules, a run from the page completes
and plays in the save node. Screenshots are saved for the record under test-artifacts/screenshots/
(git-ignored); with MOCHI_UPDATE_SCREENSHOTS=1 they replace the README's in docs/screenshots/."""

from __future__ import annotations

import os
import time

import pytest

from scripts.build_workflows import fit_and_capture
from tests.conftest import ROOT
from tests.host.frontend import bundled_workflows, load_workflow, missing_node_types

pytestmark = pytest.mark.browser

SHOTS_HOME = "docs" if os.environ.get("MOCHI_UPDATE_SCREENSHOTS") else "test-artifacts"
SHOTS = ROOT / SHOTS_HOME / "screenshots"
WORKFLOWS = sorted(bundled_workflows())


def served_workflow(page, name: str) -> dict:
    """The workflow as the templates browser fetches it from the server."""
    return page.evaluate(
        "async (n) => (await fetch(`/api/workflow_templates/mochi-nodes/${n}.json`)).json()", name)


def sampler_state(page) -> dict:
    return page.evaluate("""() => {
      const n = app.graph._nodes.find((n) => n.type === "Mochi1Sampler");
      const v = (name) => n.widgets.find((w) => w.name === name).value;
      const info = document.querySelector(".mochi1-shape-info");
      return {width: v("width"), height: v("height"), frames: v("frames"),
              info: n.mochiShapeInfo, dom: info && info.textContent};
    }""")


def set_sampler_widget(page, name: str, value) -> None:
    page.evaluate("""([name, value]) => {
      const n = app.graph._nodes.find((n) => n.type === "Mochi1Sampler");
      const w = n.widgets.find((w) => w.name === name);
      w.value = value;
      w.callback?.(value, app.canvas, n);
    }""", [name, value])


def test_our_extension_is_registered(page):
    names = page.evaluate("() => app.extensions.map((e) => e.name)")
    assert "mochi.nodes" in names


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_with_no_missing_nodes(page, name):
    workflow = served_workflow(page, name)
    assert missing_node_types(page, workflow) == []
    load_workflow(page, workflow)
    page.wait_for_timeout(300)  # the frontend reports schema problems in a toast
    assert not page.evaluate("() => document.body.innerText.includes('Invalid workflow')"), (
        "the frontend's workflow schema check rejected the file")
    loaded = page.evaluate("() => app.graph._nodes.map((n) => n.type)")
    assert sorted(loaded) == sorted(n["type"] for n in workflow["nodes"])
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    sampler = next(n for n in prompt.values() if n["class_type"] == "Mochi1Sampler")
    assert "mochi_shape_info" not in sampler["inputs"], "a UI-only widget reached the prompt"
    SHOTS.mkdir(parents=True, exist_ok=True)
    fit_and_capture(page, SHOTS / f"{name}.png")


def test_shape_helpers_snap_and_show_the_latent_size(page):
    load_workflow(page, served_workflow(page, "mochi1_text_to_video"))
    state = sampler_state(page)
    assert (state["width"], state["height"], state["frames"]) == (848, 480, 163)
    assert state["info"] == "latent 12×28×60×106 · 44,520 tokens" == state["dom"]
    set_sampler_widget(page, "frames", 50)
    set_sampler_widget(page, "width", 850)
    set_sampler_widget(page, "height", 470)
    state = sampler_state(page)
    assert (state["width"], state["height"], state["frames"]) == (848, 464, 49)
    assert state["info"] == "latent 12×9×58×106 · 13,833 tokens"
    saved = page.evaluate("""() => JSON.parse(JSON.stringify(app.graph.serialize())).nodes
        .find((n) => n.type === "Mochi1Sampler").widgets_values""")
    assert saved[:3] == [848, 464, 49] and len(saved) == 12, "the info widget must not be saved"


def test_a_run_from_the_page_completes_and_plays(page, comfy):
    workflow = served_workflow(page, "mochi1_fast_preview")
    load_workflow(page, workflow)
    files = comfy.demo_files
    page.evaluate("""(files) => {
      const set = (type, name, value) => {
        const n = app.graph._nodes.find((n) => n.type === type);
        const w = n.widgets.find((w) => w.name === name);
        w.value = value;
        w.callback?.(value, app.canvas, n);
      };
      set("Mochi1DiTLoader", "dit_name", files.dit);
      set("Mochi1TextEncoderLoader", "t5_name", files.t5);
      set("Mochi1VAELoader", "vae_name", files.vae);
      set("Mochi1Sampler", "width", 64);
      set("Mochi1Sampler", "height", 48);
      set("Mochi1Sampler", "frames", 13);
      set("Mochi1Sampler", "steps", 3);
      set("Mochi1Sampler", "seed", 99);
    }""", files)
    before = set(comfy.get("/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 180
    new = []
    while time.monotonic() < deadline and not new:
        new = [v for k, v in comfy.get("/history").items() if k not in before]
        time.sleep(0.5)
    assert new, "the prompt queued from the page never finished"
    (entry,) = new
    assert entry["status"]["status_str"] == "success", entry["status"]
    page.wait_for_selector(".mochi1-player video", state="attached", timeout=30_000)
    src = page.evaluate("() => document.querySelector('.mochi1-player video').src")
    saved = next(v for v in entry["outputs"].values() if "mochi_video" in v)["mochi_video"][0]
    assert saved["filename"] in src
    page.wait_for_function(
        "() => document.querySelector('.mochi1-player video').readyState >= 2", timeout=30_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    fit_and_capture(page, SHOTS / "run_from_the_page.png")
