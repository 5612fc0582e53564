"""A test-only ComfyUI node: swaps a folder of the output folder for a link while a graph runs.

``tests/host/test_save_video.py`` installs it (next to the pack) in a server of its own and wires
it between the decoder and the save node, so the swap happens after the prompt was validated and
before the save node runs, deterministically, by the graph's own order. Never part of the pack.
"""

from __future__ import annotations

import os

import folder_paths


class SwapFolderForLink:
    """Renames ``output/<folder>`` to ``<folder>.moved`` and puts a link to ``target`` in its
    place; passes the frames on unchanged."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "swap"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 -- the host's name
        return {"required": {"images": ("IMAGE",), "folder": ("STRING", {"default": ""}),
                             "target": ("STRING", {"default": ""})}}

    @classmethod
    def IS_CHANGED(cls, **_):  # noqa: N802 -- the host's name; never served from the cache
        return float("nan")

    def swap(self, images, folder, target):
        path = os.path.join(folder_paths.get_output_directory(), folder)
        if os.path.lexists(path):
            os.rename(path, path + ".moved")
        os.symlink(target, path, target_is_directory=True)
        return (images,)


NODE_CLASS_MAPPINGS = {"MochiTestSwapFolderForLink": SwapFolderForLink}
