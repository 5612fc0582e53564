"""VAE decode: peak memory and time vs clip length — our streamed decode, our untiled decode
and diffusers' AutoencoderKLMochi with tiling enabled, same random weights.

Full channel widths (the real decoder: base 128, widths 128/256/512/768, fp32) at a small
resolution (default 8×8 latents = 64×64 pixels, because one decoded frame costs ~70 GFLOP
there and this CPU runs ~100–200 GFLOP/s), for several clip lengths (6T − 5 pixel frames).
The contenders alternate within each clip length. Peak memory is the process's resident
high-water mark over the RSS before the call (see bench/_util.py), with every allocation of
1 MiB or more served by its own mmap so that freed tensors leave the RSS at once (without
this, glibc's heap and the OpenMP threads' arenas keep freed chunks and the peaks grow with
the number of calls rather than with the live tensors; ``--heap-rss`` shows that). The
streamed decode is checked against our untiled one (relative L2 and max abs difference).

At 64×64 pixels diffusers' spatial tiles (256 px minimum by default) do not engage, and its
frame-wise temporal decoding crashes for Mochi (SPEC §3.8), so "diffusers tiled" is its
decoder with tiling enabled as a user would call it, which here decodes the whole clip at once.

    .venv/bin/python bench/bench_vae.py                       # 25 and 163 frames, ~10 min
    .venv/bin/python bench/bench_vae.py --frames 7 25 49 85 163 --contenders streamed untiled
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _util import environment, fmt_bytes, measure, return_freed_memory_at_once

from mochi_core import vae_tiling
from mochi_core.vae import DecoderConfig, EncoderConfig
from tests.oracles_vae import (
    build_decoder,
    diffusers_vae,
    random_decoder_state_dict,
    random_encoder_state_dict,
    relative_error,
)

CONTENDERS = ("streamed", "untiled", "diffusers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[25, 163])
    parser.add_argument("--latent", type=int, default=8, help="latent height = width")
    parser.add_argument("--chunk", type=int, default=3, help="latent frames per streamed call")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--heap-rss",
        action="store_true",
        help="keep glibc's default heap (peaks then include retained memory)",
    )
    args = parser.parse_args()
    if not args.heap_rss:
        return_freed_memory_at_once()
    print(environment())

    dec_cfg, enc_cfg = DecoderConfig(), EncoderConfig()
    dec_sd = random_decoder_state_dict(dec_cfg, torch.Generator().manual_seed(0))
    ours = build_decoder(dec_cfg, dec_sd)
    runs = {
        "streamed": lambda z: vae_tiling.decode(ours, z, frames_per_chunk=args.chunk),
        "untiled": lambda z: vae_tiling.decode(ours, z),
    }
    if "diffusers" in args.contenders:
        enc_sd = random_encoder_state_dict(enc_cfg, torch.Generator().manual_seed(1))
        theirs = diffusers_vae(dec_cfg, enc_cfg, dec_sd, enc_sd)
        theirs.enable_tiling()
        del enc_sd

        def diffusers_decode(z: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return theirs.decode(z).sample

        runs["diffusers"] = diffusers_decode
    runs = {name: run for name, run in runs.items() if name in args.contenders}
    px = 8 * args.latent
    print(
        f"decoder widths {dec_cfg.channels}, fp32; {px}×{px} pixels ({args.latent}×"
        f"{args.latent} latents); streamed: {args.chunk} latent frames per call; "
        f"{args.reps} rep(s)\n"
    )
    print(f"{'frames':>6} {'contender':<10} {'seconds':>8} {'cpu s':>7} {'peak over base':>15} "
          f"{'vs untiled: rel L2':>19} {'max abs':>9}")  # fmt: skip
    names = list(runs)
    for frames in args.frames:
        assert (frames - 1) % 6 == 0, "pixel frames must be 6k + 1"
        T = (frames - 1) // 6 + 1
        z = torch.randn(1, dec_cfg.latent_channels, T, args.latent, args.latent,
                        generator=torch.Generator().manual_seed(2))  # fmt: skip
        stats = {name: [] for name in runs}
        outputs: dict[str, torch.Tensor] = {}
        for rep in range(args.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                m = measure(lambda name=name, z=z: runs[name](z))
                outputs[name] = m.result
                m.result = None
                stats[name].append(m)
        ref = outputs.get("untiled")
        for name, ms in stats.items():
            wall = statistics.median(m.wall for m in ms)
            cpu = statistics.median(m.cpu for m in ms)
            peak = statistics.median(m.peak for m in ms)
            if ref is not None and name != "untiled":
                diff = outputs[name].float() - ref
                err = f"{relative_error(outputs[name], ref):>19.2e} {diff.abs().max():>9.2e}"
            else:
                err = f"{'—':>19} {'—':>9}"
            print(f"{frames:>6} {name:<10} {wall:>8.1f} {cpu:>7.1f} {fmt_bytes(peak):>15} {err}",
                  flush=True)  # fmt: skip
        del outputs


if __name__ == "__main__":
    main()
