"""Block offload (the CLI's ``--offload-blocks``) against the host's own partial load (ComfyUI's
``--lowvram`` path, or any card too small for the whole DiT), at equal memory for the weights.

Usage::

    python bench/bench_offload.py [--budgets 6 8 12 16] [--streams 2]

The full-size DiT is built on the meta device (no memory) with the host's layers, as the DiT
loader node builds it, and ``ModelPatcher.load(lowvram_model_memory=budget)`` of the real host
decides what it places; ``--streams`` is the host's ``NUM_STREAMS`` (2 on NVIDIA, the default),
which sizes the buffer it reserves for streamed layers. For block offload, ``resident`` is the
largest block count whose weights fit the same budget next to the weights outside the blocks.
Printed per budget and storage: the weights placed on the device and the weights copied to it
per forward (each streamed weight once per forward, both ways). Transfer time and its overlap
with compute need a GPU: not measured here.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import ROOT  # noqa: E402

GB = 1e9


def host():
    """The ComfyUI snapshot in ``.host/ComfyUI`` in CPU mode, and the pack's host adapter."""
    sys.path.insert(0, str(ROOT / ".host" / "ComfyUI"))
    from comfy.cli_args import args

    args.cpu = True
    spec = importlib.util.spec_from_file_location("managed", ROOT / "nodes" / "managed.py")
    managed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(managed)
    return managed


def host_partial_load(managed, storage: str, budget: float) -> dict[str, float]:
    import comfy.model_patcher

    from mochi_core.checkpoints import LayerStorage
    from mochi_core.dit import AsymmDiT, DiTConfig

    fp8 = storage == "fp8"
    weights = torch.float8_e4m3fn if fp8 else torch.bfloat16
    layers = managed.dit_operations(torch.device("cpu"))(
        LayerStorage(None if fp8 else weights, torch.bfloat16, weights if fp8 else None))
    model = AsymmDiT(DiTConfig.mochi_preview(), operations=layers, device="meta", dtype=weights)
    patcher = comfy.model_patcher.ModelPatcher(
        managed.Managed(model), torch.device("meta"), torch.device("meta"))
    patcher.load(torch.device("meta"), lowvram_model_memory=budget)
    size, placed = patcher.model_size(), patcher.loaded_size()
    return {"size": size / GB, "placed": placed / GB, "streamed": (size - placed) / GB,
            "buffer": patcher.model.model_offload_buffer_memory / GB,
            "block": comfy.model_management.module_size(model.blocks[1]) / GB,
            "depth": len(model.blocks)}


def block_offload(size: float, block: float, depth: int, budget: float) -> dict[str, float]:
    """``offload_blocks(resident=N)`` with the largest N whose blocks fit ``budget`` (bytes)
    next to the weights outside the blocks (N - 2 blocks stay, the others stream, with
    prefetch); sizes in GB."""
    outside = size - depth * block
    resident = max(2, min(depth, int((budget / GB - outside) // block)))
    streamed = 0.0 if resident >= depth else (depth - (resident - 2)) * block
    return {"resident": resident, "placed": outside + resident * block, "streamed": streamed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[6, 8, 12, 16],
                        help="weight budgets in GB")
    parser.add_argument("--streams", type=int, default=2, help="the host's NUM_STREAMS")
    options = parser.parse_args()
    managed = host()
    import comfy.model_management

    comfy.model_management.NUM_STREAMS = options.streams
    print("storage budget | host partial load: placed, streamed/forward (buffer) | "
          "block offload: resident blocks, placed, streamed/forward")
    for storage in ("bf16", "fp8"):
        whole = host_partial_load(managed, storage, 1e15)
        for budget in options.budgets:
            if budget >= whole["size"]:
                continue
            ours = host_partial_load(managed, storage, budget * GB)
            blocks = block_offload(whole["size"], whole["block"], whole["depth"], budget * GB)
            print(f"{storage:>5} {budget:5.1f} GB | {ours['placed']:5.2f} GB, "
                  f"{ours['streamed']:5.2f} GB ({ours['buffer']:.2f} GB) | "
                  f"{blocks['resident']:2d}, {blocks['placed']:5.2f} GB, "
                  f"{blocks['streamed']:5.2f} GB")


if __name__ == "__main__":
    main()
