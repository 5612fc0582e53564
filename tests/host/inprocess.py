"""The pack imported in the test process the way ComfyUI imports it, on the host's own modules.

For tests that drive the host's memory management directly (``ModelPatcher.load`` with a
budget, ``load_models_gpu``) instead of through a server: the host runs in CPU mode (as
:func:`tests.conftest.import_host` sets it), its model folders point at demo checkpoints.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import HOST_DIR, ROOT, import_host

PACKAGE = "mochi_nodes_under_test"
HOST_NODES = "comfy_host_nodes_under_test"
FOLDERS = ("diffusion_models", "vae", "text_encoders", "loras")


def import_pack(cpu: bool = True) -> ModuleType:
    """The pack's ``nodes`` package, imported under the host (once per process): in CPU mode,
    or (``cpu=False``) with the host's arguments as already parsed."""
    if cpu:
        import_host()
    elif str(HOST_DIR) not in sys.path:
        sys.path.insert(0, str(HOST_DIR))
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pack
        spec.loader.exec_module(pack)
        pack._register_core()
    return importlib.import_module(f"{PACKAGE}.nodes")


def host_nodes() -> ModuleType:
    """The host's own ``nodes.py`` (ConditioningConcat and the other core nodes).

    ``import nodes`` is ambiguous in this process: the repository root is on ``sys.path`` too, and
    its ``nodes/`` package may have been imported first under that name by another test. The
    host's module is therefore taken from its file, under a name of its own when ``nodes`` is
    already something else."""
    import_host()
    path = (HOST_DIR / "nodes.py").resolve()
    for name in ("nodes", HOST_NODES):
        module = sys.modules.get(name)
        if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == path:
            return module
    spec = importlib.util.spec_from_file_location(HOST_NODES, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[HOST_NODES] = module
    spec.loader.exec_module(module)
    return module


def use_model_folder(folder: Path) -> None:
    """Make ``folder`` the first model folder of every kind the loaders read."""
    import folder_paths  # noqa: PLC0415  (the host's, importable after import_host)

    for kind in FOLDERS:
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
