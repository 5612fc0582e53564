"""Where the loader nodes place each model under the host's flags, on a simulated GPU.

Run by ``test_placement_flags.py`` in a process of its own (the host reads its flags once, at
import): ``python -m tests.host.placement_probe MODEL_FOLDER [HOST FLAGS...]``. The host parses
the flags with its own argument parser; torch's CUDA device queries answer as a 24 GB RTX 4090
would (this machine has no GPU; nothing is ever allocated or run on the simulated one); the
Mochi loader nodes run on the demo checkpoints in MODEL_FOLDER; the devices and dtypes of the
patchers they return are printed as one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

GIB = 2**30
SIMULATED = SimpleNamespace(name="NVIDIA GeForce RTX 4090 (simulated)", major=8, minor=9,
                            total_memory=24 * GIB, multi_processor_count=128)


def simulate_a_gpu() -> None:
    """torch's CUDA queries answer for one 24 GB device with 22 GB free."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.get_device_properties = lambda device=None: SIMULATED
    cuda.get_device_name = lambda device=None: SIMULATED.name
    cuda.get_allocator_backend = lambda: "native"
    cuda.mem_get_info = lambda device=None: (22 * GIB, SIMULATED.total_memory)
    cuda.memory_stats = lambda device=None: {"reserved_bytes.all.current": 0,
                                             "active_bytes.all.current": 0}


def main() -> None:
    folder, flags = Path(sys.argv[1]), sys.argv[2:]
    simulate_a_gpu()
    from tests.host.inprocess import HOST_DIR, import_pack, use_model_folder  # noqa: PLC0415

    sys.path.insert(0, str(HOST_DIR))
    import comfy.options  # noqa: PLC0415

    comfy.options.enable_args_parsing()
    sys.argv = ["main.py", *flags]
    import comfy.model_management as mm  # noqa: PLC0415  (parses the flags)

    nodes = import_pack(cpu=False)
    from mochi_core import demo  # noqa: PLC0415

    made = demo.make_demo_checkpoints(folder)  # already there: reused
    use_model_folder(folder)
    loaders = nodes.loaders
    dit = loaders.DiTLoader.execute(made.dit.name, "default", "sdpa", "off", lora_1="none",
                                    lora_2="none").result[0]
    t5 = loaders.TextEncoderLoader.execute(made.t5.name, "default").result[0]
    vae = loaders.VAELoader.execute(made.vae.name, "none", "fp32").result[0]

    def where(patcher) -> list[str]:
        return [str(patcher.load_device), str(patcher.offload_device)]

    t5_dtype = {p.dtype for p in t5.conditioner.encoder.parameters()}
    print(json.dumps({"vram_state": mm.vram_state.name, "dit": where(dit),
                      "vae": where(vae), "t5": where(t5.patcher),
                      "t5_dtype": [str(d) for d in sorted(t5_dtype, key=str)]}))


if __name__ == "__main__":
    main()
