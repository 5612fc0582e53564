"""The core library must stay free of the host: it is the pack's ``dequant.py``."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

HOST_MODULES = {
    "comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
    "execution", "latent_preview", "node_helpers",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_mochi_core_never_imports_the_host():
    files = sorted((ROOT / "mochi_core").rglob("*.py"))
    assert files, "mochi_core has no Python files"
    offenders = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in files
        for module in imported_modules(path)
        if module.split(".")[0] in HOST_MODULES
    }
    assert not offenders, f"mochi_core imports the host: {sorted(offenders)}"


def test_the_check_sees_a_host_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom comfy.ops import manual_cast\n")
    assert "comfy.ops" in imported_modules(probe)
