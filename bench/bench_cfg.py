"""Batched CFG (cond and uncond as one 2-row forward) against two separate passes.

    .venv/bin/python bench/bench_cfg.py [--frames 7] [--width 848] [--height 480] [--reps 5]

One guided step ``v̂ = v_u + s·(v_c − v_u)`` of a reduced-width AsymmDiT (random weights, 2
blocks of width 768 with 6 heads of 128, real T5 width 4096 and 256-token prompts) on the CPU.
The two contenders alternate within every repetition after one warm-up each; the script prints
the median seconds of each, their ratio and the largest difference between their velocities.
Cases: a 40-token prompt against Genmo's empty (zeroed, 0-token) negative, and against a
12-token negative (a ragged batch: the shorter prompt's padded keys are masked).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _util  # noqa: F401  (puts the project root on sys.path)
import torch

from mochi_core.demo import DemoDiTSize, random_dit_state_dict
from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.sampling import guided_velocity
from mochi_core.text import TextConditioning

SIZE = DemoDiTSize(depth=2, hidden_x=768, hidden_y=384, heads=6, mlp_x=2048, mlp_y=1024,
                   t5_dim=4096)  # fmt: skip


def prompt(tokens: int, seed: int) -> TextConditioning:
    """A 256-token T5-like conditioning with ``tokens`` real tokens (zeros when 0)."""
    feats = torch.randn(1, 256, SIZE.t5_dim, generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(256)[None] < tokens
    return TextConditioning(feats * mask[..., None], mask)


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_case(model: AsymmDiT, z: torch.Tensor, neg_tokens: int, reps: int) -> None:
    """Print one row: medians of both ways, ratio, max |difference|."""
    pos, neg = prompt(40, 1), prompt(neg_tokens, 2)

    def step(batched: bool) -> torch.Tensor:
        return guided_velocity(model, z, 0.7, pos, neg, 4.5, batch_cfg=batched)

    step(True), step(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for rep in range(reps):
        for batched in (True, False) if rep % 2 == 0 else (False, True):
            seconds, outs[batched] = timed(lambda b=batched: step(b))
            times[batched].append(seconds)
    one, two = statistics.median(times[True]), statistics.median(times[False])
    diff = (outs[True] - outs[False]).abs().max().item()
    print(f"{'40 vs ' + str(neg_tokens) + ' tokens':>16} {one:10.3f} {two:10.3f} {one / two:7.3f}"
          f" {diff:10.2e}")  # fmt: skip


def main() -> None:
    """Parse the options and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=7, help="pixel frames (6k+1)")
    parser.add_argument("--width", type=int, default=848)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    sd = random_dit_state_dict(0, SIZE)
    model = AsymmDiT(DiTConfig.from_state_dict(sd)).eval()
    model.load_state_dict(sd)
    latent = (1, 12, (args.frames - 1) // 6 + 1, args.height // 8, args.width // 8)
    z = torch.randn(latent, generator=torch.Generator().manual_seed(0))
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    print(f"one CFG step, {SIZE.depth} blocks of width {SIZE.hidden_x}, {args.width}×"
          f"{args.height}×{args.frames} ({tokens} visual tokens), {torch.get_num_threads()} "
          f"threads, median of {args.reps}")  # fmt: skip
    print(f"{'case':>16} {'batched s':>10} {'2 passes s':>10} {'ratio':>7} {'max |Δv|':>10}")
    for neg_tokens in (0, 12):
        bench_case(model, z, neg_tokens, args.reps)


if __name__ == "__main__":
    main()
