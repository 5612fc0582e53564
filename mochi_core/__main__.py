"""Command-line text-to-video: ``python -m mochi_core --prompt "..." --output out.mp4``.

Every option is checked before any model is loaded. ``--demo`` writes a small random-weight
checkpoint set (:mod:`mochi_core.demo`) to a cache directory and uses small defaults, so the
whole pipeline runs on a CPU in about a minute; its output is labelled as random-weight noise.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

#: Full-size defaults (Genmo's CLI) and the small ones used with --demo.
DEFAULTS = {"width": 848, "height": 480, "frames": 163, "steps": 64, "cfg": 6.0}
DEMO_DEFAULTS = {"width": 128, "height": 96, "frames": 25, "steps": 8, "cfg": 4.5}
WEIGHT_DTYPES = {"default": None, "bf16": "bfloat16", "fp8_e4m3fn": "float8_e4m3fn",
                 "fp32": "float32"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mochi_core", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default=None, help="text prompt (required unless --demo)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    p.add_argument("--width", type=int, help="multiple of 16 (default 848; demo 128)")
    p.add_argument("--height", type=int, help="multiple of 16 (default 480; demo 96)")
    p.add_argument("--frames", type=int, help="6k+1 frames (default 163; demo 25)")
    p.add_argument("--steps", type=int, help="sampler steps (default 64; demo 8)")
    p.add_argument("--cfg", type=float, help="guidance scale, 1 = off (default 6.0; demo 4.5)")
    p.add_argument("--seed", type=int, default=1710977262, help="noise seed (CPU generator)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the file (default 30)")
    p.add_argument("--output", type=Path,
                   help="output .mp4/.webm/.gif/.webp (never overwritten)")  # fmt: skip
    p.add_argument("--quality", type=int, default=85, help="0-100 (default 85)")
    p.add_argument("--dit", type=Path, help="DiT checkpoint (Genmo, ComfyUI, kijai, diffusers)")
    p.add_argument("--vae", type=Path, help="VAE checkpoint holding the decoder")
    p.add_argument("--t5", type=Path, help="T5-XXL encoder (ComfyUI text_encoders layout)")
    p.add_argument("--tokenizer", type=Path, help="directory with the T5 tokenizer.json")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "flash", "sage"))
    p.add_argument("--decode-chunk", type=int, default=3,
                   help="latent frames per streamed decoder call; exact for any value, "
                        "smaller uses less memory (default 3)")  # fmt: skip
    p.add_argument("--weight-dtype", default="default", choices=tuple(WEIGHT_DTYPES),
                   help="storage dtype of the DiT weights, cast per layer at compute time "
                        "(default: as stored in the file)")  # fmt: skip
    p.add_argument("--dit-tile", type=int, default=0,
                   help="sample the DiT on square tiles of this many pixels (multiple of 16; "
                        "0 = off): memory follows the tile")  # fmt: skip
    p.add_argument("--dit-tile-overlap", type=int, default=128,
                   help="pixels shared by neighbouring DiT tiles (multiple of 16, default 128)")
    p.add_argument("--decode-tile", type=int, default=0,
                   help="decode on square tiles of this many pixels (multiple of 8; 0 = whole "
                        "frames); feathered, approximate")  # fmt: skip
    p.add_argument("--offload-blocks", type=int, default=0,
                   help="keep at most N transformer blocks on the device, stream the rest "
                        "from CPU memory (0 = off)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (falls back to eager)")
    p.add_argument("--demo", action="store_true",
                   help="random small weights, small defaults; output is NOISE")  # fmt: skip
    return p


def _settings(args: argparse.Namespace):
    from .pipeline import GenerationSettings  # noqa: PLC0415

    defaults = DEMO_DEFAULTS if args.demo else DEFAULTS
    values = {k: getattr(args, k) if getattr(args, k) is not None else v
              for k, v in defaults.items()}  # fmt: skip
    prompt = args.prompt if args.prompt is not None else "a red panda eating bamboo"
    return GenerationSettings(prompt=prompt, negative_prompt=args.negative_prompt,
                              seed=args.seed, **values)  # fmt: skip


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Validate everything that can be checked without loading a model; exits on errors."""
    from .text import find_tokenizer_dir  # noqa: PLC0415
    from .video import FORMATS  # noqa: PLC0415

    settings = _settings(args)
    errors = [f"--{k.replace('_', '-')} {v}" for k, v in settings.problems().items()]
    if args.demo:
        errors += [f"--{n} cannot be combined with --demo (it writes its own weights)"
                   for n in ("dit", "vae", "t5") if getattr(args, n) is not None]  # fmt: skip
    else:
        if args.prompt is None:
            errors.append("--prompt is required (unless --demo)")
        errors += [f"--{n} is required (unless --demo)" for n in ("dit", "vae", "t5")
                   if getattr(args, n) is None]  # fmt: skip
        errors += [f"--{n} {getattr(args, n)}: no such file" for n in ("dit", "vae", "t5")
                   if getattr(args, n) is not None and not getattr(args, n).exists()]  # fmt: skip
    try:
        find_tokenizer_dir(args.tokenizer)
    except FileNotFoundError as err:
        errors.append(f"--tokenizer: {err}")
    if args.output is None:
        args.output = Path(f"mochi_{'demo_' if args.demo else ''}{args.seed}.mp4")
    if args.output.suffix.lstrip(".").lower() not in FORMATS:
        errors.append(f"--output must end in one of {', '.join('.' + f for f in FORMATS)}")
    if args.output.exists():
        errors.append(f"--output {args.output} already exists (never overwritten)")
    if not args.fps > 0:
        errors.append(f"--fps must be > 0, got {args.fps}")
    if args.decode_chunk < 1:
        errors.append(f"--decode-chunk must be >= 1, got {args.decode_chunk}")
    if not 0 <= args.quality <= 100:
        errors.append(f"--quality must be in 0..100, got {args.quality}")
    errors += _dit_option_errors(args)
    if errors:
        parser.error("\n  ".join(errors))
    return settings


def _dit_option_errors(args: argparse.Namespace) -> list[str]:
    """Check the DiT options and keep them as ``args.dit_options`` (a ``DiTOptions``)."""
    import torch  # noqa: PLC0415

    from .pipeline import DiTOptions  # noqa: PLC0415
    from .tiled_sampling import TileOptions  # noqa: PLC0415

    errors, tiling = [], None
    for name in ("dit_tile", "dit_tile_overlap"):
        value = getattr(args, name)
        if value < 0 or value % 16:
            errors.append(f"--{name.replace('_', '-')} must be 0 or a multiple of 16, got {value}")
    if args.decode_tile < 0 or args.decode_tile % 8:
        errors.append(f"--decode-tile must be 0 or a multiple of 8, got {args.decode_tile}")
    if args.offload_blocks < 0:
        errors.append(f"--offload-blocks must be >= 0 (0 = off), got {args.offload_blocks}")
    if args.dit_tile and not errors:
        side, overlap = args.dit_tile // 8, args.dit_tile_overlap // 8
        try:
            tiling = TileOptions(tile=(side, side), overlap=overlap)
        except ValueError as err:
            errors.append(f"--dit-tile/--dit-tile-overlap: {err}")
    dtype = WEIGHT_DTYPES[args.weight_dtype]
    args.dit_options = DiTOptions(
        dtype=getattr(torch, dtype) if dtype else None, attention=args.attention, tiling=tiling,
        offload_resident=args.offload_blocks or None,
        compile_backend="inductor" if args.compile else None,
    )  # fmt: skip
    return errors


def _demo_paths(seed: int):
    from .demo import make_demo_checkpoints  # noqa: PLC0415
    from .pipeline import CheckpointPaths  # noqa: PLC0415

    cache = Path(os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir()) / "mochi-nodes-demo"
    demo = make_demo_checkpoints(cache, seed=seed)
    return CheckpointPaths(demo.dit, demo.vae, demo.t5)


def _peak_memory_mib(device) -> dict[str, float]:
    import torch  # noqa: PLC0415

    out = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


class _ProgressBars:
    """tqdm bars for sampling and decoding, each opened on its first report."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def _update(self, name: str, unit: str, done: int, total: int) -> None:
        from tqdm import tqdm  # noqa: PLC0415

        bar = self.bars.get(name)
        if bar is None:
            bar = self.bars[name] = tqdm(total=total, desc=name, unit=unit)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def on_step(self, step: int, total: int, _preview) -> None:
        self._update("sampling", "step", step, total)

    def on_decode(self, done: int, total: int) -> None:
        self._update("decoding", "chunk", done, total)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _file_metadata(args: argparse.Namespace, settings, paths) -> dict:
    """Generation settings embedded in the video file; demo output is labelled as noise."""
    from .demo import DEMO_NOTE, DEMO_TAG  # noqa: PLC0415

    metadata = {
        "generator": "mochi-nodes", "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt, "seed": settings.seed,
        "steps": settings.steps, "cfg": settings.cfg, "fps": args.fps,
        "width": settings.width, "height": settings.height, "frames": settings.frames,
        "checkpoints": {k: getattr(paths, k).name for k in ("dit", "vae", "t5")},
    }  # fmt: skip
    if args.demo:
        metadata |= {DEMO_TAG: DEMO_NOTE, "comment": DEMO_NOTE}
    return metadata


def _print_summary(out: Path, result, args: argparse.Namespace, settings, elapsed: float,
                   device) -> None:  # fmt: skip
    """The CLI's result: the output path, then what was made, the time and peak memory."""
    memory = ", ".join(f"{k} {v:.0f} MiB" for k, v in _peak_memory_mib(device).items())
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    f, h, w = result.frames.shape[:3]
    print(out)
    print(f"{f} frames {w}x{h} @ {args.fps:g} fps, {settings.steps} steps, "
          f"cfg {settings.cfg:g}"
          f"{' [DEMO: random weights, noise]' if args.demo else ''}")
    print(f"time {elapsed:.1f}s ({stages}); peak memory: {memory}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = _check(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("mochi_core")

    import torch  # noqa: PLC0415

    from .demo import DEMO_NOTE  # noqa: PLC0415
    from .finite import NonFiniteError  # noqa: PLC0415
    from .memory import InsufficientMemoryError  # noqa: PLC0415
    from .pipeline import CheckpointPaths, generate  # noqa: PLC0415
    from .video import write_video  # noqa: PLC0415

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.demo:
        log.warning("DEMO MODE: %s", DEMO_NOTE)
        paths = _demo_paths(0)
    else:
        paths = CheckpointPaths(args.dit, args.vae, args.t5, args.tokenizer)
    start = time.perf_counter()
    bars = _ProgressBars()
    try:
        result = generate(paths, settings, device=device, dit=args.dit_options,
                          frames_per_chunk=args.decode_chunk,
                          tile_size=args.decode_tile // 8 or None, sample_callback=bars.on_step,
                          decode_callback=bars.on_decode)  # fmt: skip
    except (InsufficientMemoryError, NonFiniteError) as err:
        # Known refusals: the message says what to change; a traceback would only bury it.
        bars.close()  # first, so that no bar is drawn over the message
        print(f"mochi_core: error: {err}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    out = write_video(result.frames, args.output, args.fps, quality=args.quality,
                      metadata=_file_metadata(args, settings, paths))  # fmt: skip
    _print_summary(out, result, args, settings, time.perf_counter() - start, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
