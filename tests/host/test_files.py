"""Model and output files through the real server (issue 5 items 2 and 3).

A symlink in a model folder that points outside the model folders is refused before anything
runs, while links inside them keep working; a pickle with a payload placed in a model folder
ends in a clear error and is never unpickled; videos are written only under the output folder
(also when a sub-folder of it is a link that leaves it) and an existing file is never
overwritten.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.core.test_no_network import import_pack_nodes
from tests.host.media import read_video, saved_files
from tests.host.test_bad_inputs import assert_refused_cleanly, output_files
from tests.host.test_errors import base_prompt
from tests.host.test_reliability import execution_error

pytestmark = pytest.mark.host

FOLDERS = {"dit": ("dit_name", "diffusion_models"), "vae": ("vae_name", "vae"),
           "t5": ("t5_name", "text_encoders")}


@pytest.fixture(scope="module")
def outside(comfy, tmp_path_factory) -> Path:
    """A folder outside the server's base directory holding copies of the demo files."""
    folder = tmp_path_factory.mktemp("outside_models")
    models = comfy.base / "models"
    for node, (_, kind) in FOLDERS.items():
        shutil.copyfile(models / kind / comfy.demo_files[node], folder / f"{node}.safetensors")
    return folder


@pytest.mark.parametrize("node", list(FOLDERS))
def test_a_link_leaving_the_model_folders_is_refused(comfy, outside, node):
    field, kind = FOLDERS[node]
    link = comfy.base / "models" / kind / f"leaving_{node}.safetensors"
    link.symlink_to(outside / f"{node}.safetensors")
    prompt = base_prompt(comfy.demo_files)
    prompt[node]["inputs"][field] = link.name
    text = assert_refused_cleanly(comfy, prompt, node)
    for words in (field, link.name, str(outside), "outside", "extra_model_paths.yaml"):
        assert words in text, f"{words!r} not in {text!r}"


def split_demo_dit(comfy, folder: Path, second: Path) -> str:
    """The demo DiT as two shards with a diffusers-style index: the first shard in ``folder``
    (the file chosen in the loader), the second at ``second``; returns the loader's name."""
    src = comfy.base / "models" / "diffusion_models" / comfy.demo_files["dit"]
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    sd = load_file(src)
    keys = sorted(sd)
    names = ["dit-00001-of-00002.safetensors", "dit-00002-of-00002.safetensors"]
    folder.mkdir()
    save_file({k: sd[k] for k in keys[::2]}, folder / names[0], metadata=metadata)
    save_file({k: sd[k] for k in keys[1::2]}, second, metadata=metadata)
    weight_map = {k: names[i % 2] for i, k in enumerate(keys)}
    (folder / "dit.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return f"{folder.name}/{names[0]}"


def test_a_shard_linking_out_of_the_model_folders_is_refused(comfy, tmp_path):
    """The loader reads every shard an index beside the chosen file names; each one gets the
    link rule: the split model runs with both shards inside, and is refused, naming the
    shard, once the second shard is a link leaving the model folders."""
    folder = comfy.base / "models" / "diffusion_models" / "sharded"
    name = split_demo_dit(comfy, folder, tmp_path / "away.safetensors")
    shard = folder / "dit-00002-of-00002.safetensors"
    shutil.copyfile(tmp_path / "away.safetensors", shard)
    prompt = base_prompt(comfy.demo_files, seed=35)
    prompt["dit"]["inputs"]["dit_name"] = name
    assert comfy.run(prompt)["status"]["status_str"] == "success"

    shard.unlink()
    shard.symlink_to(tmp_path / "away.safetensors")
    text = assert_refused_cleanly(comfy, prompt, "dit")
    for words in ("dit_name", shard.name, str(tmp_path / "away.safetensors"), "outside"):
        assert words in text, f"{words!r} not in {text!r}"


def test_a_link_to_a_system_file_is_refused_without_reading_it(comfy):
    link = comfy.base / "models" / "loras" / "passwd.safetensors"
    link.symlink_to("/etc/passwd")
    prompt = base_prompt(comfy.demo_files)
    prompt["dit"]["inputs"]["lora_1"] = link.name
    text = assert_refused_cleanly(comfy, prompt, "dit")
    assert "lora_1" in text and "outside the 'loras' model folders" in text, text


def test_links_inside_the_model_folders_still_work(comfy):
    """A link to another file of the tree runs; a sub-folder link to a folder that is not a
    'vae' folder (here models/shared) is refused like any other link leaving them."""
    vae = comfy.base / "models" / "vae"
    (vae / "inside_link.safetensors").symlink_to(vae / comfy.demo_files["vae"])
    shared = comfy.base / "models" / "shared"
    shared.mkdir()
    shutil.copyfile(vae / comfy.demo_files["vae"], shared / "v.safetensors")
    (vae / "linked_dir").symlink_to(shared, target_is_directory=True)
    prompt = base_prompt(comfy.demo_files, seed=31)
    prompt["vae"]["inputs"]["vae_name"] = "inside_link.safetensors"
    assert comfy.run(prompt)["status"]["status_str"] == "success"
    prompt["vae"]["inputs"]["vae_name"] = "linked_dir/v.safetensors"
    text = assert_refused_cleanly(comfy, prompt, "vae")
    assert str(shared / "v.safetensors") in text, text


def test_a_model_folder_that_is_itself_a_link_is_allowed(tmp_path):
    """``models/vae -> /data/vae``: the folder's own real path counts as inside (checked in
    this process: the server's folders are fixed at its start)."""
    import_pack_nodes()
    import folder_paths  # importable once import_pack_nodes() has set up the host

    shared = importlib.import_module(import_pack_nodes().__name__ + "._shared")
    file_error, model_path = shared.file_error, shared.model_path

    data = tmp_path / "data"
    data.mkdir()
    (data / "v.safetensors").write_bytes(b"x")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    (data / "away.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (tmp_path / "vae").symlink_to(data, target_is_directory=True)
    saved = folder_paths.folder_names_and_paths["vae"]
    folder_paths.folder_names_and_paths["vae"] = ([str(tmp_path / "vae")], saved[1])
    folder_paths.filename_list_cache.clear()
    try:
        assert file_error("vae_name", "vae", "v.safetensors") is None
        assert model_path("vae", "v.safetensors") == str(tmp_path / "vae" / "v.safetensors")
        assert "outside the 'vae' model folders" in file_error("vae_name", "vae",
                                                               "away.safetensors")
        with pytest.raises(PermissionError, match="elsewhere.safetensors"):
            model_path("vae", "away.safetensors")
    finally:
        folder_paths.folder_names_and_paths["vae"] = saved
        folder_paths.filename_list_cache.clear()


class _Payload:
    """Creates ``marker`` when unpickled, in any Python process (only builtins are named)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("name", ["evil.ckpt", "evil_disguised.safetensors"])
def test_a_pickled_checkpoint_is_refused_and_never_unpickled(comfy, tmp_path, name):
    marker = tmp_path / "UNPICKLED"
    path = comfy.base / "models" / "diffusion_models" / name
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    pickle.loads(path.read_bytes())  # noqa: S301  (our own payload: prove that it is live)
    assert marker.exists()
    marker.unlink()

    prompt = base_prompt(comfy.demo_files, seed=32)
    prompt["dit"]["inputs"]["dit_name"] = name
    prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/pickled"
    files = output_files(comfy)
    error = execution_error(comfy.run(prompt))
    assert error["node_type"] == "Mochi1DiTLoader"
    assert name in error["exception_message"] and "pickle" in error["exception_message"]
    assert not marker.exists(), "the server unpickled the payload"
    assert output_files(comfy) == files


def test_an_output_sub_folder_linking_outside_is_refused(comfy, tmp_path):
    (comfy.output_dir / "escape_link").symlink_to(tmp_path, target_is_directory=True)
    prompt = base_prompt(comfy.demo_files)
    prompt["save"]["inputs"]["filename_prefix"] = "escape_link/video"
    text = assert_refused_cleanly(comfy, prompt, "save")
    assert "filename_prefix" in text and "inside the output folder" in text, text
    assert list(tmp_path.iterdir()) == []


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) with its sha256."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_same_prefix_twice_writes_two_files_and_touches_nothing_else(comfy):
    """Nothing outside output/ (and the host's temp/, input/ and user/ folders) changes, no existing
    file is modified, and the second run gets its own file."""
    skip = ("output", "temp", "user", "input", "server.log")  # the log is the harness's
    before = {k: v for k, v in tree(comfy.base).items() if not k.startswith(skip)}
    outputs_before = tree(comfy.output_dir)
    prompt = base_prompt(comfy.demo_files, seed=33)
    prompt["save"]["inputs"]["filename_prefix"] = "Mochi1/twice"
    first = comfy.run(prompt)
    (first_file,) = saved_files(comfy, first)["save"]
    digest = hashlib.sha256(first_file["path"].read_bytes()).hexdigest()
    prompt["sampler"]["inputs"]["seed"] = 34
    (second_file,) = saved_files(comfy, comfy.run(prompt))["save"]

    assert second_file["path"] != first_file["path"]
    assert hashlib.sha256(first_file["path"].read_bytes()).hexdigest() == digest
    assert read_video(second_file["path"]).frames == 13
    after = tree(comfy.output_dir)
    assert {k: after[k] for k in outputs_before} == outputs_before, "an existing output changed"
    assert set(after) - set(outputs_before) == {"Mochi1/" + first_file["filename"],
                                                "Mochi1/" + second_file["filename"]}
    now = {k: v for k, v in tree(comfy.base).items() if not k.startswith(skip)}
    assert now == before, sorted(set(now.items()) ^ set(before.items()))[:5]
