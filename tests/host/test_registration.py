"""The pack as the host sees it: import, node definitions, schema snapshot, web and templates."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.host

NODE_IDS = ["Mochi1DiTLoader", "Mochi1VAELoader", "Mochi1TextEncoderLoader", "Mochi1TextEncode",
            "Mochi1Sampler", "Mochi1DiTTiling", "Mochi1VAEDecode", "Mochi1VAEEncode",
            "Mochi1SaveVideo"]
SNAPSHOT = ROOT / "tests" / "host" / "schema_snapshot.json"
MODEL_FOLDER_INPUTS = {"dit_name", "vae_name", "second_file", "t5_name", "lora_1", "lora_2"}


@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    return comfy.get("/object_info")


def ours(object_info: dict) -> dict:
    return {k: v for k, v in object_info.items() if v.get("python_module", "").endswith(
        "mochi-nodes") or k.startswith("Mochi1")}


def test_pack_imports_without_failure(comfy):
    log = comfy.log()
    lines = [ln for ln in log.splitlines() if "custom_nodes/mochi-nodes" in ln]
    assert lines, "the host never reported loading the pack"
    assert not any("IMPORT FAILED" in ln for ln in lines), "\n".join(lines)


def test_package_exports_only_the_v3_entry_point():
    spec = importlib.util.spec_from_file_location("mochi_pack_probe", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no host needed: importing registers nothing by itself
    assert callable(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")
    assert module.WEB_DIRECTORY == "./web" and (ROOT / "web" / "mochi.js").is_file()


def test_object_info_lists_every_node_with_tooltips(object_info):
    nodes = ours(object_info)
    assert sorted(nodes) == sorted(NODE_IDS)
    for node_id, info in nodes.items():
        assert node_id.startswith("Mochi1")
        assert info["category"].split("/")[0] == "Mochi 1", node_id
        assert info["display_name"].startswith("Mochi 1 "), node_id
        assert len(info["description"]) > 40, node_id
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(info["output_tooltips"]) == len(info["output"]), node_id
        assert all(info["output_tooltips"]), f"{node_id} has an output without a tooltip"


def test_model_files_come_from_the_host_folders(object_info, comfy):
    files = comfy.demo_files
    assert files["dit"] in object_info["Mochi1DiTLoader"]["input"]["required"]["dit_name"][1][
        "options"]
    assert files["vae"] in object_info["Mochi1VAELoader"]["input"]["required"]["vae_name"][1][
        "options"]
    assert files["t5"] in object_info["Mochi1TextEncoderLoader"]["input"]["required"][
        "t5_name"][1]["options"]
    # The same files are offered to the host's own loaders: one set of folders for both.
    assert files["t5"] in object_info["CLIPLoader"]["input"]["required"]["clip_name"][0]


def schema(object_info: dict) -> dict:
    """What must not change by accident: ids, names, types, defaults, ranges, options."""
    out = {}
    for node_id, info in sorted(ours(object_info).items()):
        inputs = {}
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                kind, extra = spec[0], dict(spec[1]) if len(spec) > 1 else {}
                extra.pop("tooltip", None)
                if name in MODEL_FOLDER_INPUTS:
                    extra.pop("options", None)  # depends on the files present
                inputs[name] = {"group": group, "type": kind, **extra}
        out[node_id] = {
            "display_name": info["display_name"], "category": info["category"],
            "output_node": info["output_node"], "inputs": inputs,
            "input_order": info["input_order"],
            "outputs": list(zip(info["output"], info["output_name"], strict=True)),
        }
    return out


def test_schema_matches_the_snapshot(object_info):
    current = schema(object_info)
    if os.environ.get("MOCHI_UPDATE_SCHEMA_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    assert json.loads(json.dumps(current)) == expected, (
        "node schemas changed; if on purpose, rerun with MOCHI_UPDATE_SCHEMA_SNAPSHOT=1 and "
        "commit tests/host/schema_snapshot.json (saved workflows may need updating)")


def test_web_extension_is_served(comfy):
    status, body = comfy.request("/extensions/mochi-nodes/mochi.js")
    assert status == 200 and "registerExtension" in body
    extensions = comfy.get("/extensions")
    assert "/extensions/mochi-nodes/mochi.js" in extensions


def test_workflows_are_listed_as_templates_with_thumbnails(comfy):
    listed = comfy.get("/api/workflow_templates")
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    assert sorted(listed["mochi-nodes"]) == names
    for name in names:
        status, body = comfy.request(f"/api/workflow_templates/mochi-nodes/{name}.json")
        assert status == 200 and body["nodes"], name
        assert (ROOT / "workflows" / f"{name}.jpg").is_file(), f"{name}: no thumbnail"


def test_loader_nodes_carry_download_urls():
    folders = {"Mochi1DiTLoader": "diffusion_models", "Mochi1VAELoader": "vae",
               "Mochi1TextEncoderLoader": "text_encoders", "CLIPLoader": "text_encoders",
               "VAELoader": "vae"}
    for path in (ROOT / "workflows").glob("*.json"):
        workflow = json.loads(path.read_text())
        for node in workflow["nodes"]:
            if node["type"] not in folders:
                continue
            (model,) = node["properties"]["models"]
            assert model["directory"] == folders[node["type"]], path.name
            assert re.match(r"https://huggingface\.co/.+/resolve/main/.+\.safetensors$",
                            model["url"]), model
            assert model["name"] == node["widgets_values"][0], path.name
