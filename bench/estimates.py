"""Full-size GPU estimates computed from the real configuration (see mochi_core/estimates.py).

ESTIMATES, not measurements: no GPU was used. Weight memory per storage precision; activation
memory of one DiT forward at 848×480×163 (28 × 60 × 106 latents, 44,520 visual tokens, 256
text tokens — the worst case) untiled and for a few tile sizes; FLOPs per forward and per
sampling step (two forwards for CFG). The FLOP count of the traced forward is cross-checked
against the analytic formula and against a real (small) CPU forward.

    .venv/bin/python bench/estimates.py            # ~1 min, prints the markdown tables
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
from _util import environment
from bench_dit import flop_counter_mode

from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.estimates import (
    analytic_forward_flops,
    dit_forward_trace,
    parameter_count,
    weight_bytes,
)
from mochi_core.vae import Decoder, Encoder

GB = 1e9
FULL_THW = (28, 60, 106)  # 163 frames at 848×480


def weights_table() -> None:
    models = {
        "DiT (AsymmDiT, 48 blocks)": AsymmDiT(DiTConfig.mochi_preview(), device="meta",
                                             dtype=torch.bfloat16),
        "VAE decoder": Decoder(device="meta", dtype=torch.bfloat16),
        "VAE encoder": Encoder(device="meta", dtype=torch.bfloat16),
    }  # fmt: skip
    print("| model | parameters | fp32 | bf16 | fp8 (e4m3fn / scaled) |")
    print("|---|---:|---:|---:|---:|")
    for name, model in models.items():
        sizes = [weight_bytes(model, s) / GB for s in ("fp32", "bf16", "fp8")]
        print(f"| {name} | {parameter_count(model):,} | "
              + " | ".join(f"{s:.2f} GB" for s in sizes) + " |")  # fmt: skip
    print(
        "\nfp8: Linear/Conv weights 1 byte, biases bf16; RoPE frequencies and QK-norm weights "
        "fp32 in every mode. The T5 text encoder is not included."
    )


def tiles_along(size: int, tile: int, overlap: int) -> int:
    """Tiles of ``tile`` with ``overlap`` needed to cover ``size`` (1 when it fits)."""
    return 1 if tile >= size else math.ceil((size - overlap) / (tile - overlap))


def activation_table(config: DiTConfig, text_tokens: int) -> None:
    T, H, W = FULL_THW
    cases = [
        ("untiled, B=1 (CFG as two passes)", (T, H, W), 1, torch.bfloat16, 0),
        ("untiled, B=2 (batched CFG)", (T, H, W), 2, torch.bfloat16, 0),
        ("untiled, B=1, fp8 weights", (T, H, W), 1, torch.bfloat16, 1),
        ("spatial tiles 32×56 latents, overlap 8", (T, 32, 56), 1, torch.bfloat16, 8),
        ("spatial tiles 32×32 latents, overlap 8", (T, 32, 32), 1, torch.bfloat16, 8),
        ("temporal windows of 13 latent frames, overlap 4", (13, H, W), 1, torch.bfloat16, 4),
    ]
    print(
        "| case | visual tokens per forward | activation peak per forward | forwards per "
        "step (CFG) | TFLOP per forward | TFLOP per step |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, thw, batch, dtype, overlap in cases:
        storage = torch.float8_e4m3fn if "fp8" in name else None
        trace = dit_forward_trace(config, thw, text_tokens=text_tokens, batch=batch,
                                  compute_dtype=dtype, storage_dtype=storage)  # fmt: skip
        if "temporal" in name:
            tiles = tiles_along(T, thw[0], overlap)
        else:
            tiles = tiles_along(H, thw[1], overlap) * tiles_along(W, thw[2], overlap)
        forwards = 2 * tiles // batch
        per_forward = trace.flops / batch
        print(f"| {name} | {trace.tokens:,} | {trace.activation_peak / GB:.2f} GB | {forwards} | "
              f"{trace.flops / 1e12:.0f} | {forwards * trace.flops / 1e12:.0f} |"
              if batch == 1 else
              f"| {name} | {trace.tokens:,} ×2 | {trace.activation_peak / GB:.2f} GB | "
              f"{forwards} | {per_forward / 1e12:.0f} per sample | "
              f"{forwards * trace.flops / 1e12:.0f} |")  # fmt: skip
    print(
        "\nActivation model: the peak, over one forward traced on meta tensors, of the bytes of "
        "every live tensor created during it (weights and inputs excluded), with attention "
        "allocating only its output and log-sum-exp as fused GPU kernels do; bf16 compute. "
        "Not included: allocator caching/fragmentation, CUDA context, library workspaces. "
        "Tiled rows: one tile's forward (the blended full-size velocity adds "
        f"{12 * T * H * W * 4 / 1e6:.0f} MB); tiles counted as ceil((size − overlap) / "
        "(tile − overlap)) per axis."
    )


def flops_cross_check(text_tokens: int) -> None:
    """Counted-on-meta FLOPs = analytic FLOPs = FLOPs counted on a real CPU forward."""
    config = dataclasses.replace(DiTConfig.mochi_preview(), depth=2)
    thw = (2, 8, 12)
    meta = dit_forward_trace(config, thw, text_tokens=text_tokens, compute_dtype=torch.float32)
    analytic = analytic_forward_flops(config, meta.tokens, text_tokens)
    model = AsymmDiT(config).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_channels, *thw, generator=gen)
    y_feat = torch.randn(1, 256, config.t5_feat_dim, generator=gen)
    y_mask = torch.arange(256)[None] < text_tokens
    with flop_counter_mode() as counter, torch.no_grad():
        model(x, torch.tensor([0.5]), y_feat, y_mask)
    real = counter.get_total_flops()
    print(f"\nFLOP cross-check (depth 2, full width, latents {thw}, {text_tokens} text tokens): "
          f"traced on meta {meta.flops:,}; real CPU forward {real:,}; analytic {analytic:,} "
          f"(relative gaps {abs(meta.flops - real) / real:.1e}, "
          f"{abs(analytic - real) / real:.1e}).")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-tokens", type=int, default=256)
    args = parser.parse_args()
    print(environment())
    print("\nESTIMATES computed from the configuration on the meta device; no GPU measured.\n")
    weights_table()
    print(
        f"\nOne sampling step at 848×480×163 (latents {FULL_THW}), {args.text_tokens} text "
        "tokens, full depth (48 blocks):\n"
    )
    activation_table(DiTConfig.mochi_preview(), args.text_tokens)
    flops_cross_check(args.text_tokens)


if __name__ == "__main__":
    main()
