"""The ComfyUI frontend in headless Chromium (Playwright), driven through its public ``app``.

Used to convert the bundled UI-format workflows to API prompts with the frontend's own
``app.graphToPrompt()``, and by the browser tests.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

from tests.conftest import ROOT

WORKFLOWS = ROOT / "workflows"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
READY_TIMEOUT_MS = 90_000


def bundled_workflows() -> dict[str, dict]:
    """Every bundled workflow, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(WORKFLOWS.glob("*.json"))}


@contextmanager
def browser_page(url: str, viewport=(1600, 1000)):
    """A page on the host's frontend, ready (``window.app.graph`` exists)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is missing (scripts/setup.sh installs it)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.console_messages = []  # (type, text); errors are expected (HOST.md), not failed on
            page.on("console", lambda m: page.console_messages.append((m.type, m.text)))
            page.goto(url, wait_until="domcontentloaded", timeout=READY_TIMEOUT_MS)
            page.wait_for_function("() => window.app && window.app.graph && "
                                   "window.LiteGraph && window.LiteGraph.registered_node_types",
                                   timeout=READY_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def load_workflow(page, workflow: dict) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)


def missing_node_types(page, workflow: dict) -> list[str]:
    types = sorted({n["type"] for n in workflow["nodes"] if n["type"] not in ("Note",
                                                                             "MarkdownNote")})
    return page.evaluate(
        "(types) => types.filter(t => !(t in window.LiteGraph.registered_node_types))", types)


def graph_to_prompt(page, workflow: dict) -> dict:
    """The API-format prompt of ``workflow``, by the frontend's own ``app.graphToPrompt()``."""
    load_workflow(page, workflow)
    return json.loads(page.evaluate(
        "async () => JSON.stringify((await window.app.graphToPrompt()).output)"))


def convert_all(url: str) -> dict[str, dict]:
    """API prompts of every bundled workflow, converted in one browser session."""
    with browser_page(url) as page:
        return {name: graph_to_prompt(page, wf) for name, wf in bundled_workflows().items()}
