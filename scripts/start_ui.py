"""Start the full ComfyUI web UI on localhost with this pack installed.

Uses the pinned host in ``.host/ComfyUI`` and a base directory of its own (``out/ui``), with
the real Mochi 1 files linked from ``--models`` when they are there, otherwise the demo
checkpoint (random weights, labelled ``mochi_demo_*``). Open the printed URL, then the
templates: the Templates button of the left side bar → Extensions → mochi-nodes.

On the demo checkpoint the templates, which name the real files, cannot run; the launcher writes
demo copies of them (``DEMO_<template>``: the demo files, a small size, outputs named
``DEMO_random_weights_…``) into the Workflows side bar instead (``scripts/demo_workflows.py``).
The frontend's missing-models dialog is on, so a template whose real files are missing says
which and where to get them. The video-to-video template's clip is placed in ``input/``.
Stop with Ctrl-C.

Usage: .venv/bin/python scripts/start_ui.py [--models ~/ComfyUI/models] [--port 8188]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.comfy_server import place_input_clip, start_server, stop_server  # noqa: E402
from scripts.demo_workflows import write_demo_workflows  # noqa: E402
from scripts.run_main_job import models_error, prepare_base  # noqa: E402

#: Frontend settings of a person's session, over the test defaults of ``seed_base``: the
#: missing-models dialog names a template's missing files and their downloads.
UI_SETTINGS = {"Comfy.Workflow.ShowMissingModelsWarning": True}


def prepare_ui(base: Path, files: dict[str, str], demo: bool) -> list[Path]:
    """The UI's settings, the input clip and (on the demo checkpoint) the demo copies."""
    settings = base / "user" / "default" / "comfy.settings.json"
    values = json.loads(settings.read_text()) if settings.exists() else {}
    settings.write_text(json.dumps(values | UI_SETTINGS))
    place_input_clip(base)
    return write_demo_workflows(base, files) if demo else []


def port_error(port: int) -> str | None:
    """The port must be a TCP port that is free on 127.0.0.1 (the server listens there)."""
    if not 1 <= port <= 65535:
        return f"--port must be from 1 to 65535, got {port}"
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            return f"--port {port} cannot be used ({err.strerror}); choose another, e.g. 8189"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=os.environ.get("MOCHI_MODELS"),
                        help="a ComfyUI models folder holding the real Mochi 1 files")
    parser.add_argument("--demo", action="store_true", help="use the demo checkpoint anyway")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "ui")
    args = parser.parse_args()
    errors = [e for e in (models_error(args.models), port_error(args.port)) if e]
    if errors:
        parser.error("\n  ".join(errors))

    base = args.out.resolve()
    base.mkdir(parents=True, exist_ok=True)
    files, demo = prepare_base(base, Path(args.models) if args.models else None, args.demo)
    copies = prepare_ui(base, files, demo)
    import torch

    server = start_server(base, ("--preview-method", "latent2rgb"),
                          cpu=not torch.cuda.is_available(), port=args.port)
    kind = "DEMO checkpoint (random weights)" if demo else "real Mochi 1 weights"
    print(f"ComfyUI with mochi-nodes: {server.url}  ({kind}: {', '.join(files.values())})")
    print("templates: the Templates button of the left side bar → Extensions → mochi-nodes")
    if copies:
        print("on the demo checkpoint, run the demo copies instead (random weights; outputs "
              "DEMO_random_weights_…): Workflows side bar (w) → "
              + ", ".join(p.stem for p in copies))
    print(f"server log: {server.log_path}; output: {server.output_dir}; Ctrl-C to stop")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on SIGTERM too
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
