"""The first hour in the UI, in a 1280×720 window: the templates open the way a person opens
them (Templates in the left side bar → Extensions → mochi-nodes → a card), whole, legible and
on screen; their thumbnails fill the browser's square tiles; and on the demo checkpoint the demo
copies that the launcher writes into the Workflows side bar run as they are and write files
labelled ``DEMO_random_weights_``."""

from __future__ import annotations

import json
import time

import pytest

from scripts.demo_workflows import DEMO_SHAPE, OUTPUT_LABEL, write_demo_workflows
from tests.host.frontend import browser_page, bundled_workflows
from tests.host.media import read_video, saved_files

pytestmark = pytest.mark.browser

WINDOW = (1280, 720)
TEMPLATES = sorted(bundled_workflows())
RUNNABLE_ON_DEMO = [n for n in TEMPLATES if n != "mochi1_native_interop"]
#: The frontend's default level-of-detail threshold (px of text); the test server lowers it
#: for its screenshots, a person's browser has this one.
DEFAULT_LOD_FONT = 8

#: Points on each node's border (inset 2 px) that a person cannot see: outside the window, or
#: covered by anything but the canvas and the node's own DOM widgets (text areas, previews).
HIDDEN_POINTS_JS = """() => {
  const c = app.canvas, [ox, oy] = c.ds.offset, s = c.ds.scale;
  const r = c.canvas.getBoundingClientRect(), out = {};
  for (const n of app.graph._nodes) {
    const x0 = r.left + (n.pos[0] + ox) * s + 2;
    const x1 = r.left + (n.pos[0] + n.size[0] + ox) * s - 2;
    const y0 = r.top + (n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT + oy) * s + 2;
    const y1 = r.top + (n.pos[1] + n.size[1] + oy) * s - 2;
    const xm = (x0 + x1) / 2, ym = (y0 + y1) / 2;
    const hidden = [[x0, y0], [xm, y0], [x1, y0], [x0, ym], [x1, ym], [x0, y1], [xm, y1], [x1, y1]]
      .filter(([x, y]) => {
        if (x < 0 || y < 0 || x >= innerWidth || y >= innerHeight) return true;
        const el = document.elementFromPoint(x, y);
        return !(el === c.canvas || (el && el.closest('.dom-widget')));
      }).map(([x, y]) => [Math.round(x), Math.round(y)]);
    if (hidden.length) out[n.title] = hidden;
  }
  return out;
}"""
OVERLAPS_JS = """() => {
  const box = (n) => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                      n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  const nodes = app.graph._nodes, out = [];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const [a, b] = [box(nodes[i]), box(nodes[j])];
    if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
      out.push(`${nodes[i].title} / ${nodes[j].title}`);
  }
  return out;
}"""


@pytest.fixture(scope="module")
def demo_copies(comfy):
    """The launcher's demo copies, written where it writes them for this server."""
    paths = write_demo_workflows(comfy.base, comfy.demo_files)
    assert sorted(p.name for p in paths) == sorted(f"DEMO_{n}.json" for n in RUNNABLE_ON_DEMO)
    return paths


@pytest.fixture(scope="module")
def window(comfy, demo_copies):
    """A frontend page in a 1280×720 window, opened after the demo copies were written (as the
    launcher writes them before it starts the server)."""
    with browser_page(comfy.url, viewport=WINDOW) as page:
        yield page


def open_templates(page) -> None:
    """Templates (left side bar) → Extensions → mochi-nodes, as a person does."""
    page.click("button[aria-label='Templates']")
    page.locator(".p-dialog").get_by_text("mochi-nodes", exact=True).click()


def close_templates(page) -> None:
    """The dialog's close button (×); Escape does not close this dialog."""
    page.locator(".p-dialog button:has(i.pi-times)").click()
    page.wait_for_function("() => !document.querySelector('.p-dialog')")


def open_template(page, name: str) -> None:
    open_templates(page)
    page.locator(".p-dialog").get_by_text(name, exact=True).click()
    page.wait_for_function("(n) => !document.querySelector('.p-dialog') && app.graph._nodes"
                           ".length === n", arg=len(bundled_workflows()[name]["nodes"]),
                           timeout=30_000)  # fmt: skip


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_template_opens_whole_and_legible_in_a_1280x720_window(window, name):
    open_template(window, name)
    window.evaluate("(px) => { app.canvas.min_font_size_for_lod = px; "
                    "app.canvas.setDirty(true, true); }", DEFAULT_LOD_FONT)  # fmt: skip
    window.wait_for_function("() => app.canvas.ds.scale > 0")  # the view is applied on load
    assert window.evaluate(HIDDEN_POINTS_JS) == {}, "nodes off-screen or under the UI's bars"
    assert window.evaluate(OVERLAPS_JS) == [], "nodes drawn over each other"
    assert window.evaluate("() => app.canvas.low_quality") is False, (
        "at this zoom the frontend draws the nodes as blank boxes")


def test_template_thumbnails_fill_the_square_tiles(window):
    """With the mochi-nodes category chosen the dialog shows our cards only; the frontend loads
    each thumbnail into a blob, so they are told apart by count, not by address."""
    open_templates(window)
    window.wait_for_function("(n) => { const imgs = [...document.querySelectorAll('.p-dialog "
                             "img')]; return imgs.length === n && imgs.every((i) => "
                             "i.complete && i.naturalWidth > 0); }", arg=len(TEMPLATES),
                             timeout=30_000)  # fmt: skip
    tiles = window.evaluate("""() => [...document.querySelectorAll('.p-dialog img')].map((i) => {
        const r = i.getBoundingClientRect();
        return [i.naturalWidth, i.naturalHeight, Math.round(r.width), Math.round(r.height)]; })""")
    close_templates(window)
    for width, height, shown_w, shown_h in tiles:
        assert width == height >= 256, f"a {width}×{height} thumbnail is not a square card"
        assert shown_w == shown_h, "the tile letterboxes the thumbnail"


def open_from_workflows_sidebar(page, path) -> None:
    """Workflows side bar → the copy's entry (the frontend lists ``user/default/workflows``);
    done when the graph on the canvas is the copy's (its node count and demo width)."""
    page.click("button[aria-label='Workflows (w)']")
    page.get_by_text(path.name, exact=True).first.click()
    page.wait_for_function("([n, width]) => app.graph._nodes.length === n && app.graph._nodes"
                           ".some((n) => n.type === 'Mochi1Sampler' && n.widgets.find("
                           "(w) => w.name === 'width').value === width)",
                           arg=[len(json.loads(path.read_text())["nodes"]), DEMO_SHAPE["width"]],
                           timeout=30_000)  # fmt: skip
    page.click("button[aria-label='Workflows (w)']")  # close the side bar again


def wait_for_new_history(comfy, before: set, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [v for k, v in comfy.get("/history").items() if k not in before]
        if new and new[0].get("status", {}).get("completed") is not None:
            return new[0]
        time.sleep(0.5)
    raise AssertionError("the run queued from the page never finished")


@pytest.mark.parametrize("name", RUNNABLE_ON_DEMO)
def test_a_demo_copy_runs_as_it_is_and_labels_its_files(window, comfy, demo_copies, name):
    (path,) = [p for p in demo_copies if p.name == f"DEMO_{name}.json"]
    open_from_workflows_sidebar(window, path)
    loaded = window.evaluate("""() => Object.fromEntries(app.graph._nodes
        .filter((n) => n.widgets).map((n) => [n.id, Object.fromEntries(
            n.widgets.map((w) => [w.name, w.value]))]))""")
    files = set(comfy.demo_files.values())
    assert {v for w in loaded.values() for k, v in w.items() if k.endswith("_name")} <= files
    before = set(comfy.get("/history"))
    window.click("button[aria-label='Run']")
    entry = wait_for_new_history(comfy, before)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    saved = [r for results in saved_files(comfy, entry).values() for r in results]
    assert saved, "the demo copy saved nothing"
    for result in saved:
        assert result["filename"].startswith(OUTPUT_LABEL), result["filename"]
        info = read_video(result["path"])
        assert info.height in (DEMO_SHAPE["height"], 2 * DEMO_SHAPE["height"])
