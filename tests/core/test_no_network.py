"""No network and no code execution (issue 5 item 9).

* The suite-wide guard (``tests/netguard.py``, installed by ``tests/conftest.py``) refuses any
  non-loopback connection; these tests prove it refuses and that the pack imports and generates
  a video under it.
* A static scan (a tripwire: it reads names, see ``code_execution_problems``): no
  ``eval``/``exec``/pickle/``torch.load``/subprocess/ctypes/dynamic import/run-time ``pip`` in the
  pack's Python (AST) except the uses listed with their reason in ``ALLOWED``, and no
  ``eval``/``new Function`` in its JavaScript; ruff's bandit rules (``S``) are selected and the
  test command runs ruff.
"""

from __future__ import annotations

import ast
import re
import socket
from pathlib import Path

import pytest
import tomllib
import torch

from tests import netguard
from tests.conftest import ROOT

#: Top-level packages that are development tools, not part of the installed pack.
NOT_THE_PACK = {"tests", "scripts", "bench"}


@pytest.fixture
def forget_blocked():
    """The attempts these tests make on purpose must not fail them afterwards."""
    before = len(netguard.BLOCKED)
    yield
    del netguard.BLOCKED[before:]


@pytest.mark.parametrize("address", [("192.0.2.1", 80), ("8.8.8.8", 53), ("2001:db8::1", 443),
                                     ("::ffff:192.0.2.1", 80), ("example.com", 443)])
def test_the_guard_refuses_outbound_connections(address, forget_blocked):
    assert netguard.installed()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(
            netguard.OutboundConnectionBlocked, match="must never reach the network"):
        sock.connect(address)
    assert netguard.BLOCKED[-1] == f"{address[0]}:{address[1]}"


def test_create_connection_and_connect_ex_are_refused_too(forget_blocked):
    with pytest.raises(netguard.OutboundConnectionBlocked):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(
            netguard.OutboundConnectionBlocked):
        udp.connect_ex(("192.0.2.1", 53))
    assert netguard.BLOCKED[-2:] == ["192.0.2.1:80", "192.0.2.1:53"]


def test_loopback_stays_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            peer, _ = server.accept()
            client.sendall(b"ok")
            assert peer.recv(2) == b"ok"
            peer.close()
    assert netguard.is_local(("localhost", 1)) and netguard.is_local(("::1", 1))
    assert netguard.is_local("/tmp/some.sock") and not netguard.is_local(("10.0.0.1", 1))


def import_pack_nodes():
    """The pack as the host imports it (a path-named package), with its node modules."""
    from tests.host.inprocess import import_pack  # noqa: PLC0415

    return import_pack()


def test_the_pack_imports_and_generates_without_the_network(tmp_path):
    from mochi_core.demo import make_demo_checkpoints
    from mochi_core.pipeline import CheckpointPaths, GenerationSettings, generate
    from mochi_core.video import write_video

    assert netguard.installed()
    before = len(netguard.BLOCKED)
    nodes = import_pack_nodes()
    assert {n.define_schema().node_id for n in nodes.NODES} >= {"Mochi1Sampler", "Mochi1DiTLoader"}
    demo = make_demo_checkpoints(tmp_path / "demo", seed=0)
    result = generate(CheckpointPaths(demo.dit, demo.vae, demo.t5),
                      GenerationSettings(prompt="a boat", width=32, height=32, frames=7, steps=2))
    assert result.frames.shape == (7, 32, 32, 3) and torch.isfinite(result.latents).all()
    write_video(result.frames.numpy(), tmp_path / "boat.mp4", fps=30, fmt="mp4")
    assert (tmp_path / "boat.mp4").stat().st_size > 0
    assert netguard.BLOCKED[before:] == []


# -- static: no code execution ------------------------------------------------------------

FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "execfile"}
#: Modules that run code or programs, unpickle, or call into native libraries.
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib",
                     "subprocess", "pip", "ensurepip", "cloudpickle", "ctypes", "cffi", "runpy",
                     "code", "codeop", "pty", "builtins"}
FORBIDDEN_ATTRS = {("torch", "load"), ("jit", "load"), ("os", "system"), ("os", "popen"),
                   ("pickle", "load"), ("pickle", "loads"), ("np", "load"), ("numpy", "load")}
#: Attribute names that, fetched by string (``getattr(os, "system")``), reach the same things.
FORBIDDEN_ATTR_NAMES = {"system", "popen", "load", "loads", "execv", "execve", "execvp",
                        "spawnv", "spawnl", "posix_spawn", "fork", "CDLL", "LoadLibrary",
                        "__import__", "eval", "exec", "compile", "__builtins__"}
#: Calls that import a module named at run time.
DYNAMIC_IMPORTS = {("importlib", "import_module"), ("importlib", "__import__")}
#: Calls that load and run code from a file path.
FILE_LOADERS = {"spec_from_file_location", "SourceFileLoader", "exec_module", "run_path"}
PIP = re.compile(r"\bpip3?\s+install\b|-m\s+pip\b")

#: The uses the scan finds in the pack on purpose, by (file, problem) with the reason. A use that
#: is not listed fails the test; a listed one that is no longer found fails it too, so the list
#: cannot go stale.
ALLOWED = {
    ("nodes/_shared.py", "import ctypes"):
        "loads the C library by its fixed name libc.so.6 to call malloc_trim",
    ("mochi_core/attention.py", "importlib.import_module(<run-time name>)"):
        "imports the optional attention packages, named in a constant table",
    ("__init__.py", "spec_from_file_location() loads code from a file"):
        "finds the pack's own mochi_core in the pack's folder",
    ("__init__.py", "exec_module() loads code from a file"):
        "runs the pack's own mochi_core/__init__.py",
}


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute):
        base = node.value
        owner = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
        return owner, node.attr
    return None


def _constant_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dynamic_import_problem(node: ast.Call, pair: tuple[str, str] | None) -> str | None:
    """``importlib.import_module(name)``: a forbidden module by name, or any run-time name."""
    is_import = pair in DYNAMIC_IMPORTS or (isinstance(node.func, ast.Name)
                                            and node.func.id == "import_module")
    if not is_import:
        return None
    label = f"{pair[0]}.{pair[1]}" if pair else "import_module"
    name = _constant_str(node.args[0]) if node.args else None
    if name is None:
        return f"{label}(<run-time name>)"
    return f"{label}({name!r})" if name.split(".")[0] in FORBIDDEN_MODULES else None


def _getattr_problem(node: ast.Call) -> str | None:
    """``getattr(x, "system")`` and friends: a forbidden attribute fetched by its name."""
    if not (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr")):
        return None
    name = _constant_str(node.args[1]) if len(node.args) > 1 else None
    return f"{node.func.id}(..., {name!r})" if name in FORBIDDEN_ATTR_NAMES else None


def _call_problem(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
        return f"{func.id}()"
    pair = _dotted(func)
    if pair in FORBIDDEN_ATTRS:
        return f"{pair[0]}.{pair[1]}()"
    if pair and pair[0] == "os" and pair[1].startswith(("exec", "spawn", "posix_spawn", "fork")):
        return f"os.{pair[1]}()"
    if pair and pair[1] in FILE_LOADERS:
        return f"{pair[1]}() loads code from a file"
    return _dynamic_import_problem(node, pair) or _getattr_problem(node)


def _node_problem(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        return _call_problem(node)
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        return f"import {names[0]}" if names else None
    if isinstance(node, ast.ImportFrom) and node.module:
        root = node.module.split(".")[0]
        return f"from {node.module} import" if root in FORBIDDEN_MODULES else None
    if isinstance(node, ast.Name) and node.id == "__builtins__":
        return "__builtins__"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return "a pip command" if PIP.search(node.value) else None
    return None


def code_execution_problems(source: str, filename: str = "<probe>") -> list[tuple[str, int, str]]:
    """Every eval/exec/pickle/torch.load/subprocess/ctypes/dynamic-import/pip use in a Python
    source, as ``(filename, line, problem)``.

    A tripwire, not a proof: it reads names, so code built to hide (an alias assigned through
    several variables, a name assembled from pieces) can pass it. Its job is to make every such
    use in the pack deliberate and listed in :data:`ALLOWED`.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if problem := _node_problem(node):
            found.append((filename, getattr(node, "lineno", 0), problem))
    return found


def pack_python_files() -> list[Path]:
    """``__init__.py`` and every top-level package of the pack (mochi_core, nodes, ...)."""
    files = [ROOT / "__init__.py"]
    for package in sorted(p.parent for p in ROOT.glob("*/__init__.py")):
        if package.name not in NOT_THE_PACK:
            files += sorted(package.rglob("*.py"))
    return files


def _pack_problems() -> list[tuple[str, int, str]]:
    return [p for f in pack_python_files()
            for p in code_execution_problems(f.read_text(), f.relative_to(ROOT).as_posix())]


def test_no_code_execution_in_the_pack():
    files = pack_python_files()
    assert len(files) > 20
    assert {ROOT / "nodes" / "loaders.py", ROOT / "mochi_core" / "checkpoints.py"} <= set(files)
    problems = [f"{f}:{line}: {what}" for f, line, what in _pack_problems()
                if (f, what) not in ALLOWED]
    assert problems == []


def test_every_allowed_use_is_still_there():
    """An entry of ALLOWED that matches nothing is stale: it goes, or it could cover a new use."""
    found = {(f, what) for f, _, what in _pack_problems()}
    assert set(ALLOWED) <= found, set(ALLOWED) - found


@pytest.mark.parametrize("source", [
    "eval('1')", "exec(code)", "x = compile(src, 'f', 'exec')", "__import__('os')",
    "import pickle", "from pickle import loads", "import subprocess", "from subprocess import run",
    "torch.load(path)", "model = torch.jit.load(p)", "os.system('ls')", "os.execv(a, b)",
    "np.load(f, allow_pickle=True)", "cmd = 'pip install evil'", "import dill", "import marshal",
    "args = [sys.executable, '-m pip']",
    "import ctypes", "from ctypes import CDLL", "import runpy", "import builtins",
    "importlib.import_module('subprocess')", "importlib.import_module(name)",
    "import_module('pickle')", "getattr(os, 'system')('ls')", "getattr(m, 'CDLL')",
    "f = __builtins__['eval']", "os.posix_spawn(p, a, e)", "os.fork()",
    "spec = importlib.util.spec_from_file_location(n, path)", "spec.loader.exec_module(m)",
])  # fmt: skip
def test_the_scan_sees_each_forbidden_use(source):
    assert code_execution_problems(source), source


def test_the_scan_passes_ordinary_code():
    ok = ("import torch\nmodel = torch.compile(m)\nx = safetensors.torch.load_file(p)\n"
          "importlib.import_module('flash_attn')\nmodel.eval()\n")
    assert code_execution_problems(ok) == []


JS_FORBIDDEN = re.compile(r"\beval\s*\(|\bnew\s+Function\s*\(|\bFunction\s*\(\s*['\"`]|"
                          r"\bset(?:Timeout|Interval)\s*\(\s*['\"`]|\bimport\s*\(\s*[^'\"`\s]")


def test_no_code_execution_in_the_javascript():
    files = sorted((ROOT / "web").rglob("*.js"))
    assert files
    problems = [f"{f.name}:{i}: {line.strip()}" for f in files
                for i, line in enumerate(f.read_text().splitlines(), 1)
                if JS_FORBIDDEN.search(line)]
    assert problems == []
    for probe in ("eval(x)", "new Function('a', b)", "setTimeout('alert(1)', 5)", "import(url)"):
        assert JS_FORBIDDEN.search(probe), probe


def test_ruff_security_rules_run_in_ci():
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "S" in lint["select"] and set(lint.get("ignore", [])) <= {"S101"}
    pack_ignores = {k: v for k, v in lint.get("per-file-ignores", {}).items()
                    if not k.startswith(("tests", "bench"))}
    assert not any(r.startswith("S") for rules in pack_ignores.values() for r in rules)
    assert ".venv/bin/ruff check ." in (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
