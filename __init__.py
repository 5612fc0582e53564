"""Mochi 1 nodes for ComfyUI: registration only.

The host imports this package from ``custom_nodes`` and calls :func:`comfy_entrypoint` (the V3
node API). Nothing else happens at import time; the node modules are imported (and the API routes
added) when the host calls the entry point, so importing this package outside ComfyUI (e.g. by a
test runner) is harmless.
"""

import importlib.util
import sys
from pathlib import Path

WEB_DIRECTORY = "./web"


def _register_core() -> None:
    """Make the bundled ``mochi_core`` library importable under its own name.

    The library is a standalone package (``python -m mochi_core``) that imports itself by its
    absolute name; the host loads this pack under a path-derived module name, so the library is
    registered once in ``sys.modules`` (``sys.path`` is left alone).
    """
    if "mochi_core" in sys.modules:
        return
    core = Path(__file__).resolve().parent / "mochi_core"
    spec = importlib.util.spec_from_file_location(
        "mochi_core", core / "__init__.py", submodule_search_locations=[str(core)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mochi_core"] = module
    spec.loader.exec_module(module)


async def comfy_entrypoint():
    """The V3 entry point: a ``ComfyExtension`` listing every Mochi 1 node.

    The host calls it while loading custom nodes, after its ``PromptServer`` exists and before
    its app starts, which is when the generation API's routes can be added (they stay off, 404,
    until an API key is configured; see ``mochi_api/settings.py``).
    """
    _register_core()
    from .mochi_api.routes import register
    from .nodes import MochiExtension

    register()

    return MochiExtension()
