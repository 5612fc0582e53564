"""The main job: the bundled text-to-video workflow through a real, headless ComfyUI server.

Starts ComfyUI (``.host/ComfyUI``) with this pack on 127.0.0.1, gives it the real Mochi 1 files
when they are in ``--models`` (a ComfyUI ``models`` folder: ``diffusion_models`` or ``unet``,
``vae``, ``text_encoders`` or ``clip``), otherwise the small generated demo checkpoint (random
weights: the video is noise, and it says so), converts ``workflows/mochi1_text_to_video.json``
to an API prompt, runs it through ``POST /prompt`` and prints where the video was written.

Usage:
    .venv/bin/python scripts/run_main_job.py [--models ~/ComfyUI/models] [--demo]
        [--prompt "..."] [--seed N] [--out out/main_job]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mochi_api.workflow import ui_to_api  # noqa: E402
from scripts.comfy_server import (  # noqa: E402
    PACK_NAME,
    fill_demo_models,
    seed_base,
    start_server,
    stop_server,
)
from scripts.demo_workflows import DEMO_SHAPE, labelled_prefix  # noqa: E402

WORKFLOW = ROOT / "workflows" / "mochi1_text_to_video.json"
# Preferred file names first (as users download them), then any file matching the pattern.
REAL_FILES = {
    "dit": (("diffusion_models", "unet"), ("mochi_preview_bf16.safetensors",
                                           "mochi_preview_fp8_scaled.safetensors"), "mochi"),
    "vae": (("vae",), ("mochi_vae.safetensors",), "mochi"),
    "t5": (("text_encoders", "clip"), ("t5xxl_fp16.safetensors",
                                       "t5xxl_fp8_e4m3fn.safetensors",
                                       "t5xxl_fp8_e4m3fn_scaled.safetensors"), "t5xxl"),
}
TARGET_FOLDER = {"dit": "diffusion_models", "vae": "vae", "t5": "text_encoders"}


def _real_file(models: Path, role: str) -> Path | None:
    """The preferred real (not demo) file of ``role`` in a models folder, or None."""
    from mochi_core.demo import is_demo_file

    folders, preferred, pattern = REAL_FILES[role]
    candidates = [models / f / n for f in folders for n in preferred]
    candidates += sorted(p for f in folders for p in (models / f).glob(f"*{pattern}*")
                         if p.suffix == ".safetensors")
    return next((p for p in candidates if p.is_file() and not is_demo_file(p)), None)


def find_real_models(models: Path | None) -> dict[str, Path] | None:
    """The real DiT, VAE and T5 files in a ComfyUI models folder, or None if one is missing."""
    if models is None or not models.is_dir():
        return None
    found = {role: _real_file(models, role) for role in REAL_FILES}
    return None if None in found.values() else found


def missing_real_files(models: Path) -> list[str]:
    """Which of the real DiT, VAE and T5 files a models folder lacks (as ``folder/name``)."""
    return [f"{folders[0]}/{preferred[0]}" for role, (folders, preferred, _) in REAL_FILES.items()
            if _real_file(models, role) is None]


def models_error(models: Path | None) -> str | None:
    """A given models folder must exist: a wrong path would quietly give the demo weights."""
    if models is not None and not models.is_dir():
        return (f"--models {models}: no such folder (a ComfyUI models folder holding "
                "diffusion_models/, vae/ and text_encoders/; also read from $MOCHI_MODELS)")
    return None


def link_models(base: Path, files: dict[str, Path]) -> dict[str, str]:
    """Symlink the real files into the server's model folders; their names by role."""
    names = {}
    for role, path in files.items():
        target = base / "models" / TARGET_FOLDER[role] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(path.resolve(), target)
        names[role] = path.name
    return names


def prepare_base(base: Path, models: Path | None, demo: bool) -> tuple[dict[str, str], bool]:
    """A base directory with the pack and either the real files or the demo checkpoint."""
    if not (base / "custom_nodes" / PACK_NAME).exists():
        seed_base(base)
    real = None if demo else find_real_models(models)
    if real:
        return link_models(base, real), False
    if models is not None and not demo:
        print(f"{models} lacks {', '.join(missing_real_files(models))}: using the DEMO checkpoint "
              "(random weights) instead", flush=True)
    return fill_demo_models(base / "models"), True


def build_prompt(object_info: dict, files: dict[str, str], demo: bool, text: str | None,
                 seed: int | None) -> dict:
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), object_info)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "Mochi1DiTLoader":
            inputs["dit_name"] = files["dit"]
        elif kind == "Mochi1VAELoader":
            inputs["vae_name"] = files["vae"]
        elif kind == "Mochi1TextEncoderLoader":
            inputs["t5_name"] = files["t5"]
        elif kind == "Mochi1TextEncode" and text:
            inputs["positive"] = text
        elif kind == "Mochi1Sampler":
            if demo:
                inputs.update(DEMO_SHAPE)
            if seed is not None:
                inputs["seed"] = seed
        elif kind == "Mochi1SaveVideo" and demo:
            inputs["filename_prefix"] = labelled_prefix(inputs["filename_prefix"])
    return prompt


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad values before the server starts (exit 2, naming the option and the range)."""
    from mochi_core.sampling import MAX_SEED
    from mochi_core.text import prompt_problem

    errors = [e for e in (models_error(args.models),) if e]
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        errors.append(f"--seed must be an integer from 0 to {MAX_SEED}, got {args.seed}")
    if args.prompt is not None and (problem := prompt_problem("--prompt", args.prompt)):
        errors.append(problem)
    if not args.timeout > 0:
        errors.append(f"--timeout must be > 0 seconds, got {args.timeout}")
    if errors:
        parser.error("\n  ".join(errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=os.environ.get("MOCHI_MODELS"),
                        help="a ComfyUI models folder holding the real Mochi 1 files")
    parser.add_argument("--demo", action="store_true", help="use the demo checkpoint anyway")
    parser.add_argument("--prompt", help="the text prompt (default: the workflow's)")
    parser.add_argument("--seed", type=int, help="the noise seed (default: the workflow's)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "main_job",
                        help="where the server's base directory (and output) lives")
    parser.add_argument("--timeout", type=float, default=6 * 3600)
    args = parser.parse_args()
    check_arguments(parser, args)

    base = args.out.resolve() / "comfy"
    base.mkdir(parents=True, exist_ok=True)
    files, demo = prepare_base(base, Path(args.models) if args.models else None, args.demo)
    label = ("DEMO CHECKPOINT (random weights; the video is noise, not a Mochi video)" if demo
             else "real Mochi 1 weights")
    print(f"[main job] weights: {label}: {files}", flush=True)
    import torch

    server = start_server(base, cpu=not torch.cuda.is_available())
    try:
        prompt = build_prompt(server.get("/object_info"), files, demo, args.prompt, args.seed)
        sampler = next(n["inputs"] for n in prompt.values() if n["class_type"] == "Mochi1Sampler")
        print(f"[main job] text-to-video {sampler['width']}x{sampler['height']}, "
              f"{sampler['frames']} frames, {sampler['steps']} steps, cfg {sampler['cfg']}, "
              f"seed {sampler['seed']} on ComfyUI at {server.url}", flush=True)
        start = time.monotonic()
        status, body = server.queue(prompt)
        if status != 200:  # the server's validation, e.g. a model file it cannot use
            print(f"[main job] REFUSED: {json.dumps(body, indent=1)[:4000]}", file=sys.stderr)
            return 1
        entry = server.wait(body["prompt_id"], timeout=args.timeout)
        if entry["status"]["status_str"] != "success":
            errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
            print(f"[main job] FAILED: {json.dumps(errors, indent=1)[:4000]}", file=sys.stderr)
            return 1
        for ui in entry["outputs"].values():
            for video in ui.get("mochi_video", []):
                path = server.output_dir / video["subfolder"] / video["filename"]
                print(f"[main job] done in {time.monotonic() - start:.1f} s: {video['frames']} "
                      f"frames at {video['fps']:g} fps ({label})")
                print(f"[main job] video written to {path}")
        return 0
    finally:
        stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
