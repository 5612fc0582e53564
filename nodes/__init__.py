"""The V3 node adapter over ``mochi_core``: one module per node family."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import conditioning, loaders, sampling, vae, video

NODES: list[type[io.ComfyNode]] = [
    *loaders.NODES, *conditioning.NODES, *sampling.NODES, *vae.NODES, *video.NODES,
]


class MochiExtension(ComfyExtension):
    """Registers the Mochi 1 nodes with the host."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
