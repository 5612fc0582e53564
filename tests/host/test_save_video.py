"""The Save Video node through the real server (issue "Reliability II", items 1, 2, 3, 6, 7).

* A 200 KiB workflow (more than Linux allows in one command-line argument, 128 KiB) is written
  into an mp4, a webm, a gif and a webp, and reads back whole.
* Prefixes that no file system can take (an unpaired surrogate; names longer in bytes than a
  file name may be, counter and extension included) are refused with HTTP 400 naming
  ``filename_prefix``; names at the byte limit run.
* An output sub-folder swapped for a link to an outside folder while the graph runs (by a
  test-only node, ``save_video_hook``, wired between the decoder and the save node): an
  ``execution_error``, and nothing is written outside ``output/``.
* A link planted at the writer's former predictable temporary name is never written through.

The server is this module's own: the pack and the test-only node, on the demo weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.comfy_server import fill_demo_models, seed_base, start_server, stop_server
from tests.host.media import read_video, saved_files
from tests.host.test_bad_inputs import assert_refused_cleanly, output_files
from tests.host.test_errors import base_prompt
from tests.host.test_reliability import execution_error

pytestmark = pytest.mark.host

HOOK = Path(__file__).resolve().parent / "save_video_hook"
FORMATS = {"mp4": "mp4 (H.264)", "webm": "webm (VP9)", "gif": "gif", "webp": "webp (animated)"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("save_video_server")
    seed_base(base)
    (base / "custom_nodes" / "mochi_test_save_hook").symlink_to(HOOK, target_is_directory=True)
    files = fill_demo_models(base / "models")
    server = start_server(base)
    server.demo_files = files
    yield server
    stop_server(server)


def big_workflow() -> dict:
    """A workflow of about 230 KB of JSON."""
    nodes = [{"id": i, "type": "Note", "widgets_values": [f"note {i}: " + "x" * 200]}
             for i in range(1000)]
    return {"nodes": nodes, "links": [], "version": 0.4}


def with_saves(prompt: dict, prefix: str, formats=FORMATS) -> dict:
    """The prompt with one save node per format (ids ``save_<fmt>``) instead of ``save``."""
    save = prompt.pop("save")
    for fmt in formats:
        prompt[f"save_{fmt}"] = {"class_type": save["class_type"], "inputs": {
            **save["inputs"], "format": FORMATS[fmt], "filename_prefix": f"{prefix}_{fmt}"}}
    return prompt


def embedded(info, fmt: str) -> dict[str, str]:
    """The tags a saved video carries: container tags (mp4/webm), or the JSON object of the gif
    comment / the webp EXIF description."""
    if fmt in ("gif", "webp"):
        return json.loads(info.metadata["comment" if fmt == "gif" else "ImageDescription"])
    return {key.lower(): value for key, value in info.metadata.items()}


def test_a_200_kib_workflow_is_embedded_in_every_format(server):
    workflow = big_workflow()
    assert len(json.dumps(workflow)) > 200 * 1024
    prompt = with_saves(base_prompt(server.demo_files, seed=40), "large/workflow")
    entry = server.run(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = saved_files(server, entry)
    for fmt in FORMATS:
        (file,) = saved[f"save_{fmt}"]
        info = read_video(file["path"])
        assert info.frames == 13, fmt
        tags = embedded(info, fmt)
        assert json.loads(tags["workflow"]) == workflow, fmt
        assert json.loads(tags["prompt"])["sampler"]["inputs"]["seed"] == 40, fmt


def test_extra_pnginfo_that_is_not_an_object_still_saves(server):
    """``extra_pnginfo`` comes from the client: a list is left out, the video is still saved
    with its prompt."""
    prompt = base_prompt(server.demo_files, seed=42)
    prompt["save"]["inputs"]["filename_prefix"] = "odd_extra/video"
    entry = server.run(prompt, extra_data={"extra_pnginfo": ["not", "an", "object"]})
    assert entry["status"]["status_str"] == "success", entry["status"]
    (file,) = saved_files(server, entry)["save"]
    tags = embedded(read_video(file["path"]), "mp4")
    assert "workflow" not in tags and json.loads(tags["prompt"])["sampler"]["inputs"]["seed"] == 42


REFUSED_PREFIXES = [
    ("Mochi1/fox\ud800snow", ["not valid Unicode", "surrogate", "character 10"]),
    ("é" * 130, ["file name", "260 bytes", "255 bytes per name", "at most 243 bytes"]),
    ("視" * 82, ["file name", "246 bytes", "at most 243 bytes"]),
    ("é" * 128 + "/video", ["folder name", "256 bytes", "255 bytes per name"]),
]


@pytest.mark.parametrize(("prefix", "words"), REFUSED_PREFIXES,
                         ids=["surrogate", "130_e_acute", "82_cjk", "long_folder"])
def test_a_prefix_no_file_system_takes_is_refused_naming_it(server, prefix, words):
    prompt = base_prompt(server.demo_files)
    prompt["save"]["inputs"]["filename_prefix"] = prefix
    text = assert_refused_cleanly(server, prompt, "save")
    assert "filename_prefix" in text and "Traceback" not in text, text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


def test_a_prefix_through_a_link_or_a_file_is_refused(server):
    """The writer never follows a link below output/, so validation refuses one already, even
    a link that stays inside output/; a file where a folder belongs is named too."""
    out = server.output_dir
    (out / "real_inside").mkdir()
    (out / "inside_link").symlink_to(out / "real_inside", target_is_directory=True)
    (out / "a_file").write_text("not a folder")
    for prefix, words in (("inside_link/video", ["'inside_link' is a link", "real folders"]),
                          ("a_file/deeper/video", ["'a_file'", "is not a folder"])):
        prompt = base_prompt(server.demo_files)
        prompt["save"]["inputs"]["filename_prefix"] = prefix
        text = assert_refused_cleanly(server, prompt, "save")
        for word in ["filename_prefix", *words]:
            assert word in text, f"{word!r} not in {text!r}"


def test_the_hosts_fields_in_a_folder_still_work(server):
    """``%year%`` in the folder part is expanded by the host's helper, which makes the folder."""
    prompt = base_prompt(server.demo_files, seed=46)
    prompt["save"]["inputs"]["filename_prefix"] = "dated/%year%/video"
    (file,) = saved_files(server, server.run(prompt))["save"]
    assert file["path"].parent.name.isdigit() and read_video(file["path"]).frames == 13


def test_names_at_the_byte_limit_are_written(server):
    """A file name of exactly 255 bytes (243 of prefix, ``_00001_.webm``) and a folder name of
    exactly 255 bytes run and are written under those names."""
    name, folder = "é" * 121 + "e", "é" * 127 + "e"
    prompt = with_saves(base_prompt(server.demo_files, seed=43), "", formats=["webm", "mp4"])
    prompt["save_webm"]["inputs"]["filename_prefix"] = name
    prompt["save_mp4"]["inputs"]["filename_prefix"] = f"{folder}/v"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = saved_files(server, entry)
    (webm,), (mp4,) = saved["save_webm"], saved["save_mp4"]
    assert len(webm["filename"].encode()) == 255 and read_video(webm["path"]).frames == 13
    assert mp4["path"].parent.name == folder and read_video(mp4["path"]).frames == 13


@pytest.mark.parametrize("rest", ["video", "deeper/video"])
def test_a_folder_swapped_for_a_link_while_running_is_refused(server, tmp_path, rest):
    """The folder is real at validation; the hook swaps it for a link to ``outside`` after
    decoding. The save fails naming the prefix and the link; nothing appears outside (no file,
    and no folder for a deeper prefix) and no video appears in ``output/``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = f"swapped_{rest.count('/')}"
    (server.output_dir / folder).mkdir()
    prompt = base_prompt(server.demo_files, seed=44)
    prompt["swap"] = {"class_type": "MochiTestSwapFolderForLink", "inputs": {
        "images": ["decode", 0], "folder": folder, "target": str(outside)}}
    prompt["save"]["inputs"].update(images=["swap", 0], filename_prefix=f"{folder}/{rest}")
    before = output_files(server)
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "Mochi1SaveVideo", error
    message = error["exception_message"]
    for words in ("filename_prefix", f"{folder}/{rest}", "is a link", str(outside)):
        assert words in message, f"{words!r} not in {message!r}"
    assert (server.output_dir / folder).is_symlink(), "the hook did not swap the folder"
    assert list(outside.iterdir()) == [], "something was written outside output/"
    assert output_files(server) == before


def test_a_link_at_the_former_temporary_name_is_not_written_through(server, tmp_path):
    """The writer used ``.<stem>.<pid>.partial.<ext>`` beside the target with ffmpeg's ``-y``: a
    link planted there overwrote its target. Now the name is random and created exclusively."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = server.output_dir / "planted"
    folder.mkdir()
    planted = folder / f".video_00001_.{server.process.pid}.partial.mp4"
    planted.symlink_to(victim)
    prompt = base_prompt(server.demo_files, seed=45)
    prompt["save"]["inputs"]["filename_prefix"] = "planted/video"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (file,) = saved_files(server, entry)["save"]
    assert file["path"] == folder / "video_00001_.mp4"
    assert victim.read_text() == "keep me"
    assert not file["path"].is_symlink() and read_video(file["path"]).frames == 13
    assert victim.stat().st_nlink == 1, "the victim was linked into output/"
    assert sorted(p.name for p in folder.iterdir()) == sorted([planted.name, file["filename"]])
