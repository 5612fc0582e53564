"""Convert a workflow saved by the ComfyUI frontend (UI format) to an API prompt without a browser.

It follows what the frontend's ``app.graphToPrompt()`` does for the graphs this pack ships
(plain nodes, links, widget values, UI-only note nodes); the host tests check that both give
the same prompt for every bundled workflow. Node definitions are those of the server's
``/object_info`` (the generation API passes its own nodes' ``GET_NODE_INFO_V1()``). Used by the
main job, the tests and, at run time, the generation API.
"""

from __future__ import annotations

UI_ONLY = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4


def _widget_values(node: dict, spec: dict) -> dict:
    """Widget name → value, walking ``widgets_values`` in widget order.

    A widget with ``control_after_generate`` (a seed) is followed by its control value, and
    frontend-only widgets (e.g. the upload button of a loader) hold a value of their own; both
    are consumed and dropped.
    """
    known = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
    values = iter(node.get("widgets_values") or [])
    out = {}
    for slot in node.get("inputs", []):
        if "widget" not in slot:
            continue
        name = slot["widget"]["name"]
        value = next(values)
        if name in known:
            out[name] = value
            options = known[name][1] if len(known[name]) > 1 else {}
            if options.get("control_after_generate"):
                next(values)
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt (``{id: {"class_type", "inputs"}}``) of a UI-format workflow."""
    links = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in UI_ONLY or node.get("mode") == MUTED:
            continue
        if node.get("mode") == BYPASSED:
            raise ValueError(f"node {node['id']} ({kind}) is bypassed; not supported here")
        if kind not in object_info:
            raise ValueError(f"node {node['id']}: unknown node type {kind!r}")
        inputs = _widget_values(node, object_info[kind])
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                inputs[slot["name"]] = list(links[slot["link"]])
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt
