"""Which RoPE positions should a DiT tile get? Prints the difference of the tiled velocity to the
untiled one for canvas positions and for tile-as-frame positions, on random weights.

    .venv/bin/python bench/bench_tiled_rope.py [--frames 7] [--seeds 3]

The latent is 848×480 (60×106 latent pixels), small enough to run untiled on a CPU. Each row is
one (model size, tile, overlap, σ) and gives the relative L2 error ‖v_tiled − v‖ / ‖v‖ of both
modes, averaged over seeds (weights and inputs), and their ratio.
"""

from __future__ import annotations

import argparse
import statistics

import _util  # noqa: F401  (puts the project root on sys.path)
import torch

from mochi_core.demo import DemoDiTSize, random_dit_state_dict
from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.tiled_sampling import TiledModel, TileOptions

WIDE = DemoDiTSize(depth=4, hidden_x=256, hidden_y=128, heads=2, mlp_x=512, mlp_y=256)
#: (name, size, local): ``local`` ties each block's visual keys to its queries (k = q rows of
#: qkv_x), so a token attends most to itself and its neighbours, as trained video DiTs' heads
#: largely do; plain random weights attend almost regardless of position.
MODELS = [
    ("demo: 2 blocks, 128 wide, 2×64 heads", DemoDiTSize(), False),
    ("demo, local (k = q)", DemoDiTSize(), True),
    ("4 blocks, 256 wide, 2×128 heads", WIDE, False),
    ("4 blocks, 256 wide, local (k = q)", WIDE, True),
]
TILES = [((32, 64), 8), ((40, 56), 16), ((32, 32), 8)]
SIGMAS = (0.9, 0.3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model_for(size: DemoDiTSize, seed: int, local: bool) -> AsymmDiT:
    """A random-weight AsymmDiT of ``size``; ``local`` sets each block's visual k rows to q's."""
    sd = random_dit_state_dict(seed, size)
    if local:
        for key in [k for k in sd if k.endswith("attn.qkv_x.weight")]:
            q, _, v = sd[key].chunk(3)
            sd[key] = torch.cat([q, q, v])
    model = AsymmDiT(DiTConfig.from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


def errors(model: AsymmDiT, latent_t: int, seed: int) -> dict[tuple, dict[str, float]]:
    """{(tile, overlap, σ): {mode: rel. error}} for one model and one random input."""
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(1, 12, latent_t, 60, 106, generator=gen)
    feats = torch.randn(1, 256, model.config.t5_feat_dim, generator=gen)
    mask = torch.arange(256)[None] < 40
    out = {}
    for sigma in SIGMAS:
        s = torch.tensor([sigma])
        full = model(x, s, feats, mask)
        for tile, overlap in TILES:
            out[(tile, overlap, sigma)] = {
                mode: rel_err(TiledModel(model, TileOptions(tile, overlap, rope=mode))(
                    x, s, feats, mask), full) for mode in ("canvas", "tile")
            }  # fmt: skip
    return out


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=7, help="pixel frames (6k+1)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    latent_t = (args.frames - 1) // 6 + 1
    torch.set_grad_enabled(False)
    print(f"848×480, {args.frames} frames, relative L2 error to the untiled velocity "
          f"(mean over {args.seeds} seeds)")  # fmt: skip
    print(f"{'model':38} {'tile':>9} {'ovl':>3} {'σ':>4} {'canvas':>8} {'tile':>8} {'ratio':>6}")
    for name, size, local in MODELS:
        runs = [errors(model_for(size, seed, local), latent_t, seed) for seed in range(args.seeds)]
        for key in runs[0]:
            canvas = statistics.mean(r[key]["canvas"] for r in runs)
            tile = statistics.mean(r[key]["tile"] for r in runs)
            (th, tw), overlap, sigma = key
            print(f"{name:38} {th:>4}×{tw:<4} {overlap:>3} {sigma:>4} {canvas:8.4f} {tile:8.4f} "
                  f"{tile / canvas:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
