"""DiT forward on this CPU: ours vs diffusers' MochiTransformer3DModel vs the host's comfy model.

Same random weights and inputs for all: depth 2 at full width (3072/1536, 24 heads), 848×480
latents (60×106) of 7 and 13 pixel frames (T = 2 and 3 latent frames), a 256-token prompt with
40 real tokens, σ = 0.7; in fp32 and in bf16 (bf16 weights and matmuls; our norms, RoPE and
modulation stay fp32 as SPEC §8 asks; the peers run bf16 the way they do).

The contenders are alternated within each repetition (rotating the order) and the medians are
printed with the ratio to the fastest peer, the achieved FLOP/s (FLOPs of one forward counted by
``torch.utils.flop_counter.FlopCounterMode``) against a 4096³ matmul measured in the same run at
the same precision, and the peak resident memory over the RSS before the call (see bench/_util).

    .venv/bin/python bench/bench_dit.py                # default: 3 reps, ~10 min on 2 cores
    .venv/bin/python bench/bench_dit.py --reps 1 --dtypes bf16 --frames 7 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

import torch
from _util import environment, fmt_bytes, matmul_flops_per_s, measure
from torch.utils import flop_counter

from mochi_core.dit import AsymmDiT, DiTConfig
from tests.oracles import (
    comfy_dit,
    comfy_velocity,
    diffusers_dit,
    diffusers_velocity,
    random_dit_state_dict,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTENDERS = ("ours", "diffusers", "host")
LAT_H, LAT_W, L_TEXT, N_REAL = 60, 106, 256, 40

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build(name: str, config: DiTConfig, sd: dict, dtype: torch.dtype) -> Forward:
    """A ``(x, sigma, y_feat, y_mask) -> v`` closure for contender ``name`` in ``dtype``."""
    if name == "ours":
        model = AsymmDiT(config, device="meta")
        model.load_state_dict(sd, strict=True, assign=True)  # keeps fp32 RoPE/QK-norm params
        model.eval()

        def run(x, sigma, y_feat, y_mask):
            with torch.no_grad():
                return model(x, sigma, y_feat, y_mask)

        return run
    if name == "diffusers":
        model = diffusers_dit(config, sd).to(dtype)
        return lambda x, s, f, m: diffusers_velocity(model, x.to(dtype), s, f.to(dtype), m)
    model = comfy_dit(config, sd).to(dtype)
    return lambda x, s, f, m: comfy_velocity(model, x.to(dtype), s, f.to(dtype), m)


def inputs(frames: int, config: DiTConfig) -> tuple[torch.Tensor, ...]:
    assert (frames - 1) % 6 == 0, "pixel frames must be 6k + 1"
    gen = torch.Generator().manual_seed(1)
    T = (frames - 1) // 6 + 1
    x = torch.randn(1, config.in_channels, T, LAT_H, LAT_W, generator=gen)
    y_feat = torch.randn(1, L_TEXT, config.t5_feat_dim, generator=gen)
    y_mask = torch.arange(L_TEXT)[None] < N_REAL
    return x, torch.tensor([0.7]), y_feat, y_mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A FlopCounterMode that also counts the CPU flash-attention op.

    torch's registry knows the CUDA SDPA kernels but not ``_scaled_dot_product_flash_attention_
    for_cpu``, which SDPA uses on this CPU, so without this the attention FLOPs (4·S²·D per
    call) would be missing from the count. The same formula as the CUDA kernels is used.
    """

    def cpu_flash(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return flop_counter.FlopCounterMode(display=False, custom_mapping={op: cpu_flash})


def profile_ours(run: Forward, args: tuple[torch.Tensor, ...], rows: int = 25) -> None:
    """Print torch.profiler's table of our forward, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(*args)
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40,
        max_shapes_column_width=60,
    )  # fmt: skip
    print(table)


def bench_case(
    runs: dict[str, Forward], args, reps: int, dtype: torch.dtype, ref: torch.Tensor | None
) -> None:
    """Warm-up with FLOP counting, then ``reps`` rotating rounds; prints one table.

    Every round ends with a 4096³ matmul in ``dtype``, so the matmul rate the forwards are
    compared with is measured under the same load as they are (median over the rounds).
    """
    n = 4096
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    mm_wall, mm_cpu = [], []
    flops, errs = {}, {}
    for name, run in runs.items():
        counter = flop_counter_mode()
        with counter:
            out = run(*args)
        flops[name] = counter.get_total_flops()
        errs[name] = f"{rel_err(out, ref):.2e}" if ref is not None else "n/a"  # fp32 only
        del out
    times = {name: [] for name in runs}
    cpus = {name: [] for name in runs}
    peaks = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            m = measure(lambda name=name: runs[name](*args))
            m.result = None
            times[name].append(m.wall)
            cpus[name].append(m.cpu)
            peaks[name].append(m.peak)
        m = measure(lambda: torch.mm(a, b))
        mm_wall.append(2 * n**3 / m.wall)
        mm_cpu.append(2 * n**3 / m.cpu)
    matmul = statistics.median(mm_wall), statistics.median(mm_cpu)
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpus.items()}
    peer_names = [n for n in runs if n != "ours"]
    fastest_peer = min(peer_names, key=med.get) if peer_names else None
    work = flops.get("ours", next(iter(flops.values())))
    print(f"  4096³ matmul in the same rounds: {matmul[0] / 1e9:.0f} GFLOP/s by wall time, "
          f"{matmul[1] / 1e9:.0f} by CPU time")  # fmt: skip
    print(
        f"  {'contender':<10} {'wall s':>7} {'×peer':>6} {'GFLOP/s':>8} {'÷mm':>5} | "
        f"{'cpu s':>6} {'×peer':>6} {'GFLOP/s':>8} {'÷mm':>5} | {'GFLOP':>6} "
        f"{'peak over base':>15} {'rel err':>9}"
    )
    for name in runs:
        ratio = med[name] / med[fastest_peer] if fastest_peer else float("nan")
        cpu_ratio = cpu[name] / cpu[fastest_peer] if fastest_peer else float("nan")
        rate = work / med[name]
        cpu_rate = work / cpu[name]
        print(
            f"  {name:<10} {med[name]:>7.2f} {ratio:>6.3f} {rate / 1e9:>8.1f} "
            f"{rate / matmul[0]:>5.2f} | {cpu[name]:>6.2f} {cpu_ratio:>6.3f} "
            f"{cpu_rate / 1e9:>8.1f} {cpu_rate / matmul[1]:>5.2f} | {flops[name] / 1e9:>6.0f} "
            f"{fmt_bytes(statistics.median(peaks[name])):>15} {errs[name]:>9}"
        )
    print(
        f"  (GFLOP/s uses our FLOP count for all, so equal work; fastest peer: {fastest_peer}; "
        f"times of each rep: "
        + "; ".join(f"{n} " + " ".join(f"{t:.2f}" for t in ts) for n, ts in times.items())
        + ")"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per case (median)")
    parser.add_argument("--frames", type=int, nargs="+", default=[7, 13])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                        choices=CONTENDERS)  # fmt: skip
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a profile of ours")
    args = parser.parse_args()

    print(environment())
    config = dataclasses.replace(DiTConfig.mochi_preview(), depth=args.depth)
    sd32 = random_dit_state_dict(config, torch.Generator().manual_seed(0))
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        sd = sd32 if dtype == torch.float32 else {k: v.to(dtype) for k, v in sd32.items()}
        runs = {name: build(name, config, sd, dtype) for name in args.contenders}
        matmul, matmul_cpu = matmul_flops_per_s(dtype)
        print(
            f"\n== {dname}: depth {config.depth}, widths {config.hidden_size_x}/"
            f"{config.hidden_size_y}, {config.num_heads} heads; 4096³ matmul "
            f"{matmul / 1e9:.0f} GFLOP/s by wall time, {matmul_cpu / 1e9:.0f} by CPU time"
        )
        for frames in args.frames:
            case = inputs(frames, config)
            T = case[0].shape[2]
            n_tok = T * (LAT_H // 2) * (LAT_W // 2)
            print(
                f"\n-- 848×480, {frames} frames (T={T}, {n_tok} visual + {N_REAL} text "
                f"tokens), {args.reps} reps"
            )
            if args.profile and "ours" in runs:
                profile_ours(runs["ours"], case)
            ref = None
            if dtype == torch.float32 and "diffusers" in runs:
                ref = runs["diffusers"](*case)
            bench_case(runs, case, args.reps, dtype, ref)
        end, end_cpu = matmul_flops_per_s(dtype)
        print(
            f"  4096³ matmul after the {dname} cases: {end / 1e9:.0f} GFLOP/s by wall time, "
            f"{end_cpu / 1e9:.0f} by CPU time"
        )
        del runs, sd


if __name__ == "__main__":
    main()
