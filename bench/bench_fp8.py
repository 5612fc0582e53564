"""fp8 fast mode against bf16 and fp8 storage: time per DiT forward and error, side by side.

Usage::

    python bench/bench_fp8.py [--depth 4] [--full-width] [--tokens 1024] [--reps 3] [--device cpu]

One random-weight DiT (seed 0; the test size, or the full widths of Mochi 1 with ``--full-width``,
``--depth`` blocks) runs one forward on the same inputs in each mode, all computing in bf16:

* ``bf16``: weights stored in bf16 (the reference of the error column);
* ``fp8 storage``: ``weight_dtype fp8_e4m3fn``, weights cast up per layer (``mochi_core.ops.cast``);
* ``fp8 fast``: ``fp8_e4m3fn_fast`` in the CLI: fp8 weights and per-tensor scaled fp8 activations
  multiplied by ``torch._scaled_mm`` (``mochi_core.ops.fp8_fast``);
* ``host fp8 fast``: the host's own fp8 layers (``comfy.ops.pick_operations(...,
  fp8_optimizations=True)``, what the DiT loader node uses with ``fp8_e4m3fn_fast``), with the
  host's ``--supports-fp8-compute`` flag set so that they multiply in fp8 on any device; skipped
  with the reason when the ComfyUI snapshot (``.host/ComfyUI``, made by ``scripts/setup.sh``) is
  missing.

Printed per mode: seconds per forward (median of ``--reps``), the number of ``_scaled_mm`` calls
per forward, and the relative L2 error of the velocity against bf16 and against an fp32 model.
On a CPU the times say nothing of a GPU's fp8 tensor cores; the errors carry over.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import ROOT, counting_scaled_mm, environment  # noqa: E402
from mochi_core import checkpoints, ops  # noqa: E402
from mochi_core.dit import AsymmDiT, DiTConfig  # noqa: E402
from tests.oracles import random_dit_state_dict  # noqa: E402

#: The test size of tests/core/test_fp8_fast.py: every width a multiple of 16.
SMALL = dict(hidden_size_x=192, hidden_size_y=128, num_heads=4, mlp_hidden_x=512,
             mlp_hidden_y=352, t5_feat_dim=128)  # fmt: skip


def config(depth: int, full_width: bool) -> DiTConfig:
    if full_width:
        full = DiTConfig.mochi_preview()
        return DiTConfig(**{**full.__dict__, "depth": depth})
    return DiTConfig(depth=depth, **SMALL)


def host_operations():
    """The host's fp8 fast layer factory for the DiT (as the loader node builds it), or the
    reason it cannot be had."""
    host_dir = ROOT / ".host" / "ComfyUI"
    if not (host_dir / "comfy").is_dir():
        return None, f"no ComfyUI snapshot in {host_dir} (run scripts/setup.sh)"
    sys.path.insert(0, str(host_dir))
    from comfy.cli_args import args  # noqa: PLC0415

    args.cpu = not torch.cuda.is_available()
    import comfy.model_management as mm  # noqa: PLC0415

    mm.SUPPORT_FP8_OPS = True  # the host's --supports-fp8-compute
    spec = importlib.util.spec_from_file_location("managed", ROOT / "nodes" / "managed.py")
    managed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(managed)
    return managed.dit_operations(mm.get_torch_device(), fp8_fast=True), None


def build(sd: dict, dtype: torch.dtype, operations, device) -> AsymmDiT:
    """The DiT holding a copy of ``sd`` stored as ``dtype`` (computing in fp32 for fp32, else in
    bf16), as the loaders build it."""
    model = checkpoints.dit_from_state_dict({k: v.clone() for k, v in sd.items()}, dtype=dtype,
                                            operations=operations)  # fmt: skip
    return model.to(device)


def inputs(cfg: DiTConfig, tokens: int, device):
    """Latents of ``tokens`` visual tokens (2 frames of a 4:3 grid), two prompts of 40 and 0
    tokens (a CFG pair)."""
    rows = max(2, int((tokens / 2 / (4 / 3)) ** 0.5))
    cols = max(2, tokens // 2 // rows)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 2, 2 * rows, 2 * cols, generator=g)
    y = torch.randn(2, 64, cfg.t5_feat_dim, generator=g)
    mask = torch.arange(64)[None] < torch.tensor([[40], [0]])
    return [t.to(device) for t in (x, torch.tensor([0.7, 0.7]), y, mask)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--full-width", action="store_true", help="Mochi 1's full widths")
    parser.add_argument("--tokens", type=int, default=1024, help="visual tokens (default 1024)")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args()
    device = torch.device(options.device)
    cfg = config(options.depth, options.full_width)
    sd = random_dit_state_dict(cfg, torch.Generator().manual_seed(0), torch.float32)
    args = inputs(cfg, options.tokens, device)
    print(environment())
    print(f"DiT depth {cfg.depth}, hidden {cfg.hidden_size_x}/{cfg.hidden_size_y}, "
          f"{args[0].shape[-1] * args[0].shape[-2] // 4 * 2} visual tokens, batch 2, {device}")
    with torch.no_grad():
        fp32 = build(sd, torch.float32, ops.cast, device)
        reference32 = fp32(*args)
        del fp32
    modes = [("bf16", torch.bfloat16, ops.cast), ("fp8 storage", torch.float8_e4m3fn, ops.cast),
             ("fp8 fast", torch.float8_e4m3fn, ops.fp8_fast)]  # fmt: skip
    host, why = host_operations()
    if host is not None:
        modes.append(("host fp8 fast", torch.float8_e4m3fn, host))
    reference = None
    print(f"{'mode':<14} {'s/forward':>10} {'_scaled_mm':>10} {'err vs bf16':>12} "
          f"{'err vs fp32':>12}")
    for name, dtype, operations in modes:
        model = build(sd, dtype, operations, device)
        with torch.no_grad():
            with counting_scaled_mm() as calls:
                out = model(*args)
            per_forward = calls[0]
            times = []
            for _ in range(options.reps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(*args)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        reference = out if reference is None else reference

        def err(a, b):
            return float((a.double() - b.double()).norm() / b.double().norm())

        print(f"{name:<14} {statistics.median(times):10.4f} {per_forward:10d} "
              f"{err(out, reference):12.2e} {err(out, reference32):12.2e}")
        del model
    if why:
        print(f"host fp8 fast: skipped: {why}")


if __name__ == "__main__":
    main()
