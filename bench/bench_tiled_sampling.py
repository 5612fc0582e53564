"""One guided sampler step at 1280×720, tiled against untiled: peak memory, time, difference.

    .venv/bin/python bench/bench_tiled_sampling.py [--frames 7] [--tile 48 80] [--overlap 8]
        [--full-width [--depth 1]]

A reduced AsymmDiT (random weights: 2 blocks of width 768, 6 heads of 128, T5 width 4096; with
``--full-width`` the real widths 3072/1536, 24 heads, MLP 8192/4096 at ``--depth`` blocks) runs
one CFG step (two passes, scale 4.5) on 1280×720 latents. Each contender runs in a fresh
subprocess; its peak memory is the growth of the process's peak RSS during the step (model and
inputs are built before). Prints both rows, the ratios and the tiled velocity's relative L2
difference to the untiled one.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import _util  # noqa: F401  (puts the project root on sys.path)
import torch

from mochi_core.demo import DemoDiTSize, random_dit_state_dict
from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.sampling import guided_velocity
from mochi_core.text import TextConditioning
from mochi_core.tiled_sampling import TiledModel, TileOptions, tile_layout

SIZE = DemoDiTSize(depth=2, hidden_x=768, hidden_y=384, heads=6, mlp_x=2048, mlp_y=1024,
                   t5_dim=4096)  # fmt: skip


def model_size(args: argparse.Namespace) -> DemoDiTSize:
    """The reduced size, or the real widths at ``args.depth`` blocks."""
    if not args.full_width:
        return SIZE
    return DemoDiTSize(depth=args.depth, hidden_x=3072, hidden_y=1536, heads=24, mlp_x=8192,
                       mlp_y=4096, t5_dim=4096)  # fmt: skip


def peak_rss_mb() -> float:
    """The process's peak resident set so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args: argparse.Namespace) -> None:
    """Child: one step of one contender; prints a JSON line, saves the velocity."""
    torch.set_grad_enabled(False)
    size = model_size(args)
    sd = random_dit_state_dict(0, size)
    model = AsymmDiT(DiTConfig.from_state_dict(sd), device="meta").eval()
    model.load_state_dict(sd, assign=True)  # no second copy: the peak so far is the weights
    del sd
    latent = (1, 12, (args.frames - 1) // 6 + 1, 90, 160)
    z = torch.randn(latent, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(1, 256, size.t5_dim, generator=torch.Generator().manual_seed(1))
    pos = TextConditioning(feats, torch.arange(256)[None] < 40)
    neg = TextConditioning(torch.zeros_like(feats), torch.zeros(1, 256, dtype=torch.bool))
    if args.child == "tiled":
        model = TiledModel(model, TileOptions(tuple(args.tile), args.overlap))
    before = peak_rss_mb()
    start = time.perf_counter()
    v = guided_velocity(model, z, 0.7, pos, neg, 4.5, batch_cfg=False)
    seconds = time.perf_counter() - start
    torch.save(v, args.out)
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb() - before}))


def contender(name: str, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--out", out, "--frames", str(args.frames),
           "--tile", *map(str, args.tile), "--overlap", str(args.overlap),
           "--depth", str(args.depth), *(["--full-width"] if args.full_width else [])]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)  # noqa: S603
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the options; run both contenders in subprocesses and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=7)
    parser.add_argument("--tile", type=int, nargs=2, default=[48, 80], help="latent h w")
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--full-width", action="store_true",
                        help="the real widths 3072/1536 (24 heads) instead of width 768")
    parser.add_argument("--depth", type=int, default=2, help="blocks with --full-width")
    parser.add_argument("--child", choices=["untiled", "tiled"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_one(args)
    latent_t = (args.frames - 1) // 6 + 1
    tiles = tile_layout((latent_t, 90, 160), TileOptions(tuple(args.tile), args.overlap))
    rows = {name: contender(name, args, f"/tmp/bench_tiled_{name}.pt")  # noqa: S108
            for name in ("untiled", "tiled")}  # fmt: skip
    full, tiled = (torch.load(f"/tmp/bench_tiled_{n}.pt") for n in ("untiled", "tiled"))  # noqa: S108
    diff = ((tiled - full).double().norm() / full.double().norm()).item()
    print(f"1280×720×{args.frames}: {latent_t * 45 * 80} visual tokens untiled; {len(tiles)} "
          f"tiles of {tiles[0].tokens} tokens ({args.tile[0]}×{args.tile[1]} latent, overlap "
          f"{args.overlap}); one CFG step (2 passes), {torch.get_num_threads()} threads, "
          f"DiT {model_size(args)}")
    print(f"{'':10} {'seconds':>9} {'peak MB':>9}")
    for name, row in rows.items():
        print(f"{name:10} {row['seconds']:9.2f} {row['peak_mb']:9.0f}")
    ratio_t = rows["tiled"]["seconds"] / rows["untiled"]["seconds"]
    ratio_m = rows["tiled"]["peak_mb"] / rows["untiled"]["peak_mb"]
    print(f"{'ratio':10} {ratio_t:9.2f} {ratio_m:9.2f}")
    print(f"tiled velocity vs untiled: relative L2 difference {diff:.4f} (random weights)")


if __name__ == "__main__":
    main()
