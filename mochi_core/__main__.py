"""Command-line text-to-video: ``python -m mochi_core --prompt "..." --output out.mp4``.

Every option is checked before any model is loaded (and before the demo weights are written):
a bad value ends the run with exit status 2 and a message naming the option and its allowed
values. ``--demo`` writes a small random-weight checkpoint set (:mod:`mochi_core.demo`) to a
cache directory and uses small defaults, so the whole pipeline runs on a CPU in seconds; its
output is labelled as random-weight noise. Installed, the same program is the ``mochi`` command;
``scripts/mochi`` runs it from a checkout, from any directory.
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
#: Longest output file name in bytes: the writer's temporary name beside it adds about 20 bytes
#: and most file systems stop at 255.
MAX_OUTPUT_NAME = 200
#: The decoder's spatial tiles overlap by 4 latent pixels, so a tile must be wider than that.
MIN_DECODE_TILE = 40
CHECKPOINTS = ("dit", "vae", "t5")


def _prog() -> str:
    """``mochi`` when run through the installed command or scripts/mochi, else ``python -m``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m mochi_core" if name in ("", "__main__.py", "-c") else name


def _number(kind: type, allowed: str):
    """An argparse ``type`` that names the allowed values when the text is not a number."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; allowed: {allowed}") \
                from None

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import MAX_CFG, MAX_FPS, MAX_FRAMES, MAX_SIZE, MAX_STEPS, MIN_FPS  # noqa: PLC0415
    from .sampling import MAX_SEED  # noqa: PLC0415

    side = f"a multiple of 16 from 16 to {MAX_SIZE}"
    p = argparse.ArgumentParser(prog=_prog(), description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default=None, help="text prompt (required unless --demo)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    p.add_argument("--width", type=_number(int, side), help=f"{side} (default 848; demo 128)")
    p.add_argument("--height", type=_number(int, side), help=f"{side} (default 480; demo 96)")
    p.add_argument("--frames", type=_number(int, f"6k+1 from 7 to {MAX_FRAMES}"),
                   help=f"6k+1 frames, 7 to {MAX_FRAMES} (default 163; demo 25)")
    p.add_argument("--steps", type=_number(int, f"1 to {MAX_STEPS}"),
                   help=f"sampler steps, 1 to {MAX_STEPS} (default 64; demo 8)")
    p.add_argument("--cfg", type=_number(float, f"0 to {MAX_CFG:g}"),
                   help=f"guidance scale 0 to {MAX_CFG:g}, 1 = off (default 6.0; demo 4.5)")
    p.add_argument("--seed", type=_number(int, f"0 to {MAX_SEED}"), default=1710977262,
                   help=f"noise seed, 0 to {MAX_SEED} (CPU generator)")
    p.add_argument("--fps", type=_number(float, f"{MIN_FPS:g} to {MAX_FPS:g}"), default=30.0,
                   help=f"frame rate of the file, {MIN_FPS:g} to {MAX_FPS:g} (default 30)")
    p.add_argument("--output", help="output .mp4/.webm/.gif/.webp in an existing folder "
                                    "(never overwritten)")  # fmt: skip
    p.add_argument("--quality", type=_number(int, "0 to 100"), default=85,
                   help="0-100 (default 85)")
    p.add_argument("--dit", type=Path, help="DiT checkpoint (Genmo, ComfyUI, kijai, diffusers)")
    p.add_argument("--vae", type=Path, help="VAE checkpoint holding the decoder")
    p.add_argument("--t5", type=Path, help="T5-XXL encoder (ComfyUI text_encoders layout)")
    p.add_argument("--tokenizer", type=Path, help="directory with the T5 tokenizer.json")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "flash", "sage"))
    _add_memory_options(p)
    p.add_argument("--demo", action="store_true",
                   help="random small weights, small defaults; output is NOISE")  # fmt: skip
    return p


def _add_memory_options(p: argparse.ArgumentParser) -> None:
    from .pipeline import MAX_SIZE, WEIGHT_DTYPES  # noqa: PLC0415

    p.add_argument("--decode-chunk", type=_number(int, "1 or more"), default=3,
                   help="latent frames per streamed decoder call; exact for any value, "
                        "smaller uses less memory (default 3)")  # fmt: skip
    p.add_argument("--weight-dtype", default="default", choices=tuple(WEIGHT_DTYPES),
                   help="storage dtype of the DiT weights, cast per layer at compute time "
                        "(default: as stored in the file); fp8_e4m3fn_fast stores fp8 and "
                        "multiplies in fp8 where the device can (Ada/Hopper GPUs)")  # fmt: skip
    p.add_argument("--dit-tile", type=_number(int, f"0 or a multiple of 16 up to {MAX_SIZE}"),
                   default=0,
                   help="sample the DiT on square tiles of this many pixels (multiple of 16; "
                        "0 = off): memory follows the tile")  # fmt: skip
    p.add_argument("--dit-tile-overlap", default=128,
                   type=_number(int, "0 or a multiple of 16, smaller than --dit-tile"),
                   help="pixels shared by neighbouring DiT tiles (multiple of 16, default 128)")
    p.add_argument("--decode-tile", default=0,
                   type=_number(int, f"0 or a multiple of 8 from {MIN_DECODE_TILE} to {MAX_SIZE}"),
                   help="decode on square tiles of this many pixels (multiple of 8; 0 = whole "
                        "frames); feathered, approximate")  # fmt: skip
    p.add_argument("--offload-blocks", type=_number(int, "0 (off) or more"), default=0,
                   help="keep at most N transformer blocks on the device, stream the rest "
                        "from CPU memory (0 = off)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (falls back to eager)")


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
    settings = _settings(args)
    errors = [f"--{k.replace('_', '-')} {v}" for k, v in settings.problems().items()]
    errors += _mode_errors(args) + _output_errors(args) + _number_errors(args)
    errors += _device_errors(args) + _dit_option_errors(args)
    if not errors:  # reading the tokenizer imports transformers: only once all else is right
        errors += _tokenizer_errors(args)
    if errors:
        parser.error("\n  ".join(errors))
    return settings


def _mode_errors(args: argparse.Namespace) -> list[str]:
    """--demo excludes the checkpoint options; otherwise the prompt and all three are needed."""
    from .text import find_tokenizer_dir  # noqa: PLC0415

    given = [n for n in CHECKPOINTS if getattr(args, n) is not None]
    if args.demo:
        errors = [f"--{n} cannot be combined with --demo (it writes its own weights)"
                  for n in given]  # fmt: skip
    else:
        errors = ["--prompt is required (unless --demo)"] if args.prompt is None else []
        errors += [f"--{n} is required (unless --demo)" for n in CHECKPOINTS if n not in given]
        errors += [e for n in given if (e := _checkpoint_error(n, getattr(args, n)))]
        if not errors:
            errors += _pairing_errors(args)
    try:
        find_tokenizer_dir(args.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        errors.append(f"--tokenizer: {err}")
    return errors


def _tokenizer_errors(args: argparse.Namespace) -> list[str]:
    """The tokenizer must read and fit T5's vocabulary (ids beyond it have no embedding)."""
    from .demo import T5_VOCAB  # noqa: PLC0415
    from .text import find_tokenizer_dir, load_tokenizer  # noqa: PLC0415

    folder = find_tokenizer_dir(args.tokenizer)
    try:
        size = len(load_tokenizer(folder))
    except Exception as err:  # noqa: BLE001 -- the tokenizers library raises many kinds
        return [f"--tokenizer {folder}: its tokenizer.json cannot be read as the T5 v1.1 "
                f"tokenizer ({type(err).__name__}: {err})"]
    if size > T5_VOCAB:
        return [f"--tokenizer {folder}: {size:,} tokens, more than T5's {T5_VOCAB:,}; use the "
                "T5 v1.1 tokenizer (ComfyUI's comfy/text_encoders/t5_tokenizer)"]
    return []


def _checkpoint_error(role: str, path: Path) -> str | None:
    """Why ``path`` cannot be the ``role`` checkpoint, from its safetensors header alone."""
    from . import checkpoints as ck  # noqa: PLC0415

    if "\x00" in str(path):
        return f"--{role}: a path cannot hold a NUL character"
    if not path.exists():
        return f"--{role} {path}: no such file"
    try:
        if role == "dit":
            ck._dit_part(ck.CheckpointSource.open(path, "transformer"))
        elif role == "t5":
            ck._t5_source(path)
        else:
            src = ck.CheckpointSource.open(path, "vae")
            fmt = ck.detect_vae_format(src.dtypes)
            if fmt is None or "decoder" not in fmt.parts:
                return (f"--vae {path}: no Mochi VAE decoder in this file; it looks like "
                        f"{fmt or ck.detect_format(src.dtypes)}")
    except (ck.CheckpointError, OSError) as err:  # the message names the file
        return f"--{role}: {err}"
    return None


def _pairing_errors(args: argparse.Namespace) -> list[str]:
    """The T5 width the DiT was trained on against the T5 file's, from the headers."""
    from . import checkpoints as ck  # noqa: PLC0415

    src = ck.CheckpointSource.open(args.dit, "transformer")
    _, prefix = ck._dit_part(src)
    dit_shape = src.shapes.get(prefix + "t5_yproj.weight")
    t5_shapes = ck._t5_source(args.t5).shapes
    t5_shape = next((s for k, s in t5_shapes.items()
                     if k.endswith("block.0.layer.0.SelfAttention.q.weight")), None)  # fmt: skip
    if dit_shape is None or t5_shape is None or dit_shape[1] == t5_shape[1]:
        return []
    return [f"--t5 {args.t5.name} gives {t5_shape[1]}-d features but --dit {args.dit.name} "
            f"expects {dit_shape[1]}-d (T5-XXL: 4096); are the checkpoints a set?"]


def _output_errors(args: argparse.Namespace) -> list[str]:
    """The output must be a new file with a video suffix in an existing, writable folder."""
    from .video import FORMATS  # noqa: PLC0415

    raw = args.output
    if raw is None:
        raw = f"mochi_{'demo_' if args.demo else ''}{args.seed}.mp4"
    suffixes = ", ".join("." + f for f in FORMATS)
    if not raw.strip() or "\x00" in raw:
        return [f"--output must be a file name ending in one of {suffixes}, got {raw!r}"]
    out = args.output = Path(raw)
    if raw.endswith(("/", os.sep)) or out.is_dir():
        return [f"--output {raw} names a folder; give a file name in it (e.g. "
                f"{out / 'video.mp4'}), ending in one of {suffixes}"]
    if out.suffix.lstrip(".").lower() not in FORMATS or not out.stem:
        return [f"--output must end in one of {suffixes}, got {raw!r}"]
    if os.path.lexists(out):
        return [f"--output {out} already exists (never overwritten); choose a new name"]
    if len(out.name.encode("utf-8", "surrogateescape")) > MAX_OUTPUT_NAME:
        return [f"--output file name is too long: at most {MAX_OUTPUT_NAME} bytes"]
    return _folder_errors(out)


def _folder_errors(out: Path) -> list[str]:
    """The output's folder must exist and take a new file (probed, then removed at once)."""
    folder = out.parent
    if not folder.exists():
        return [f"--output {out}: the folder {folder} does not exist (create it first)"]
    if not folder.is_dir():
        return [f"--output {out}: {folder} is not a folder"]
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as err:
        return [f"--output {out}: cannot create a file in {folder}: {err.strerror}"]
    os.close(fd)
    out.unlink()
    return []


def _number_errors(args: argparse.Namespace) -> list[str]:
    from .pipeline import MAX_FPS, MIN_FPS  # noqa: PLC0415

    errors = []
    if not MIN_FPS <= args.fps <= MAX_FPS:  # also refuses NaN
        errors.append(f"--fps must be from {MIN_FPS:g} to {MAX_FPS:g}, got {args.fps:g}")
    if args.decode_chunk < 1:
        errors.append(f"--decode-chunk must be 1 or more (latent frames), got {args.decode_chunk}")
    if not 0 <= args.quality <= 100:
        errors.append(f"--quality must be in 0..100, got {args.quality}")
    return errors


def _device_errors(args: argparse.Namespace) -> list[str]:
    """The device must parse and exist here; None picks cuda when available, else the CPU."""
    import torch  # noqa: PLC0415

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError, TypeError):
        return [f"--device must be cpu, cuda, cuda:N or mps, got {args.device!r}"]
    if device.type == "cpu":
        return []
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) < count:
            return []
        allowed = f"cuda:0 .. cuda:{count - 1} or cpu" if count else "cpu"
        return [f"--device {args.device}: this machine has {count} CUDA device(s); "
                f"allowed: {allowed}"]
    if device.type == "mps" and torch.backends.mps.is_available():
        return []
    return [f"--device {args.device} is not available here; allowed: cpu, cuda, cuda:N, mps "
            "(where present)"]


def _dit_option_errors(args: argparse.Namespace) -> list[str]:
    """Check the DiT options and keep them as ``args.dit_options`` (a ``DiTOptions``)."""
    from .pipeline import WEIGHT_DTYPES, DiTOptions  # noqa: PLC0415
    from .tiled_sampling import TileOptions  # noqa: PLC0415

    errors = _tile_errors(args)
    if args.offload_blocks < 0:
        errors.append(f"--offload-blocks must be >= 0 (0 = off), got {args.offload_blocks}")
    tiling = None
    if args.dit_tile and not errors:
        side = args.dit_tile // 8
        tiling = TileOptions(tile=(side, side), overlap=args.dit_tile_overlap // 8)
    storage = WEIGHT_DTYPES[args.weight_dtype]
    args.dit_options = DiTOptions(
        dtype=storage.dtype, fp8_fast=storage.fp8_fast, attention=args.attention, tiling=tiling,
        offload_resident=args.offload_blocks or None,
        compile_backend="inductor" if args.compile else None,
    )  # fmt: skip
    return errors


def _tile_errors(args: argparse.Namespace) -> list[str]:
    """DiT tiles (multiples of 16, the overlap smaller) and decoder tiles (multiples of 8)."""
    from .pipeline import MAX_SIZE  # noqa: PLC0415

    errors = []
    for name in ("dit_tile", "dit_tile_overlap"):
        value = getattr(args, name)
        if value < 0 or value % 16 or value > MAX_SIZE:
            errors.append(f"--{name.replace('_', '-')} must be 0 or a multiple of 16, got "
                          f"{value} (at most {MAX_SIZE})")
    if args.dit_tile and not errors and args.dit_tile_overlap >= args.dit_tile:
        errors.append(f"--dit-tile-overlap {args.dit_tile_overlap}: the overlap must be smaller "
                      f"than the tile (--dit-tile {args.dit_tile})")
    tile = args.decode_tile
    if tile < 0 or tile % 8 or tile > MAX_SIZE or 0 < tile < MIN_DECODE_TILE:
        errors.append(f"--decode-tile must be 0 or a multiple of 8, got {tile} (0 = whole "
                      f"frames; otherwise {MIN_DECODE_TILE} to {MAX_SIZE})")
    return errors


def _demo_paths(seed: int, tokenizer: Path | None):
    from .demo import make_demo_checkpoints  # noqa: PLC0415
    from .pipeline import CheckpointPaths  # noqa: PLC0415

    cache = Path(os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir()) / "mochi-nodes-demo"
    demo = make_demo_checkpoints(cache, seed=seed)
    return CheckpointPaths(demo.dit, demo.vae, demo.t5, tokenizer)


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


def _run(args: argparse.Namespace, settings, device, bars: _ProgressBars):
    """Generate and write the video; returns the checkpoint paths, the result and the file."""
    from .pipeline import CheckpointPaths, generate  # noqa: PLC0415
    from .video import write_video  # noqa: PLC0415

    if args.demo:
        paths = _demo_paths(0, args.tokenizer)
    else:
        paths = CheckpointPaths(args.dit, args.vae, args.t5, args.tokenizer)
    result = generate(paths, settings, device=device, dit=args.dit_options,
                      frames_per_chunk=args.decode_chunk,
                      tile_size=args.decode_tile // 8 or None, sample_callback=bars.on_step,
                      decode_callback=bars.on_decode)  # fmt: skip
    bars.close()
    out = write_video(result.frames, args.output, args.fps, quality=args.quality,
                      metadata=_file_metadata(args, settings, paths))  # fmt: skip
    return paths, result, out


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

    device = torch.device(args.device)
    if args.demo:
        log.warning("DEMO MODE: %s", DEMO_NOTE)
    start = time.perf_counter()
    bars = _ProgressBars()
    try:
        _, result, out = _run(args, settings, device, bars)
    except (InsufficientMemoryError, NonFiniteError, ValueError, OSError) as err:
        # Known refusals (memory, NaN, a checkpoint that fails to load, a file that cannot be
        # written): the message says what to change; a traceback would only bury it.
        bars.close()  # first, so that no bar is drawn over the message
        print(f"mochi_core: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bars.close()
        print("mochi_core: interrupted; no video was written", file=sys.stderr)
        return 130
    finally:
        bars.close()
    _print_summary(out, result, args, settings, time.perf_counter() - start, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
