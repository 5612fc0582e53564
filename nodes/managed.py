"""The three Mochi models under the host's model management, as its own models are.

* **Placement**: each kind of model gets the host's devices for that kind (the DiT
  ``get_torch_device``/``unet_offload_device``, the T5 ``text_encoder_device``/
  ``text_encoder_offload_device``, the VAE ``vae_device``/``vae_offload_device``), so
  ``--lowvram``, ``--novram``, ``--cpu-vae`` and ``--gpu-only`` mean for the Mochi models
  what they mean for the host's.
* **Layers**: the DiT and the VAE are built with the host's casting layers (``comfy.ops``, chosen
  by ``comfy.ops.pick_operations`` for the DiT as the host chooses for its own models), plus
  :class:`HostWeight` for the tensors the model uses in its own math. The host can then load
  them partially: it places the layers that fit and streams the others, cast per call.
* **The T5** is transformers' model, whose plain layers cannot run split between two devices: it
  is loaded whole or not at all (:class:`WholeModelPatcher`); when the host has no room for it
  the encoder runs where it is (the CPU).
* **LoRA** is applied as host patches (``ModelPatcher.add_patches``) on a clone of the loaded
  DiT: nothing is merged at load, the host patches the weights it places and patches streamed
  weights on the fly, fp8 weights stay fp8, and a strength change costs a clone (see
  :class:`LastDiT`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.weight_adapter
import torch

from mochi_core import lora, ops
from mochi_core.checkpoints import LayerStorage

log = logging.getLogger(__name__)

#: Keys of the host's state dict of a managed model start with this (the :class:`Managed` box).
PREFIX = "module."


class Managed(torch.nn.Module):
    """A container the host's ``ModelPatcher`` can manage (it sets ``.device`` on its model,
    which some modules, e.g. transformers' T5, do not allow); the model is ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


class HostWeight(ops.Weight, comfy.ops.CastWeightBiasOp):
    """:class:`mochi_core.ops.Weight` under the host's casting: when the host leaves it on the
    offload device it marks it ``comfy_cast_weights`` (and may give it weight patches), and the
    tensor is then cast to the compute device per call, as the host's layers do."""

    bias = None

    def forward(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        weight, _ = comfy.ops.cast_bias_weight(self, dtype=dtype, device=device)
        return weight


def with_weight(base: type) -> type:
    """The host's operations ``base`` (a class used as a namespace) with :class:`HostWeight`."""
    return type(f"{base.__name__}_mochi", (base,), {"Weight": HostWeight})


#: The VAE's layers: the host's casting layers, which (like ours) cast each weight to the
#: input's dtype (the encoder computes in fp32 on weights stored in bf16 or fp16).
VAE_OPERATIONS = with_weight(comfy.ops.manual_cast)


def dit_operations(load_device: torch.device,
                   fp8_fast: bool = False) -> Callable[[LayerStorage], type]:  # fmt: skip
    """For ``checkpoints.load_dit(operations=...)``: the host's layers for the loaded storage,
    picked by ``comfy.ops.pick_operations`` (plain layers when the weights are stored in the
    compute dtype, casting layers otherwise, its scaled-fp8 layers for scaled fp8 weights).
    ``fp8_fast`` is the host's ``fp8_optimizations``: its fp8 layers multiply in fp8 where
    ``supports_fp8_compute`` says the device can (its ``--fast fp8_matrix_mult`` does the same
    for every model)."""

    def choose(storage: LayerStorage) -> type:
        return with_weight(comfy.ops.pick_operations(
            storage.weight_dtype, storage.compute_dtype, load_device=load_device,
            fp8_optimizations=fp8_fast, scaled_fp8=storage.scaled_fp8))

    return choose


# --------------------------------------------------------------------------------------------
# Placement


@dataclass(frozen=True)
class Placement:
    """Where the host runs a kind of model and where it keeps it in between."""

    load_device: torch.device
    offload_device: torch.device


def dit_placement() -> Placement:
    return Placement(mm.get_torch_device(), mm.unet_offload_device())


def vae_placement() -> Placement:
    return Placement(mm.vae_device(), mm.vae_offload_device())


def text_encoder_placement() -> Placement:
    return Placement(mm.text_encoder_device(), mm.text_encoder_offload_device())


def text_encoder_dtype(requested: torch.dtype | None, placement: Placement) -> torch.dtype:
    """``requested``, or by default bf16 where the T5 runs on an accelerator (fp32 would be
    19 GB) and fp32 on the CPU (the reference precision; bf16 is slow there)."""
    if requested is not None:
        return requested
    return torch.float32 if mm.is_device_cpu(placement.load_device) else torch.bfloat16


def managed(model: torch.nn.Module, name: str, placement: Placement,
            patcher_class: type = comfy.model_patcher.ModelPatcher):
    """Put a module under the host's model management."""
    patcher = patcher_class(Managed(model), load_device=placement.load_device,
                            offload_device=placement.offload_device, size=mm.module_size(model))
    patcher.mochi_name = name
    return patcher


class WholeModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ``ModelPatcher`` that loads its model whole or not at all, for a model without the
    host's casting layers (transformers' T5), which fails when split between two devices.

    A load budget that cannot hold the whole model leaves it where it is (on its offload
    device, where it then runs); a partial unload offloads it whole.
    """

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if self.loaded_size() + extra_memory < self.model_size():
            log.info("%s: no room for the whole model on %s; it stays on %s",
                     getattr(self, "mochi_name", "model"), device_to, self.offload_device)
            if self.loaded_size() > 0:
                self.partially_unload(self.offload_device)
            return 0
        return super().partially_load(device_to, extra_memory, force_patch_weights)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        whole = self.model_size() + 1
        return super().partially_unload(device_to, whole, force_patch_weights)


# --------------------------------------------------------------------------------------------
# LoRA as host patches


def lora_patches(weights: lora.LoRAWeights) -> dict[str, comfy.weight_adapter.LoRAAdapter]:
    """Host patches (state-dict key -> the host's LoRA adapter) for a Genmo-format LoRA: the
    host computes ``W + strength · (α / r) · up @ down`` in fp32, as :func:`lora.apply_lora`."""
    patches = {}
    for name, layer in weights.layers.items():
        alpha = layer.alpha if layer.alpha is not None else (
            None if layer.scale == 1.0 else layer.scale * layer.rank)
        patches[f"{PREFIX}{name}.weight"] = comfy.weight_adapter.LoRAAdapter(
            set(), (layer.up, layer.down, alpha, None, None, None))
    return patches


def add_lora(patcher, weights: lora.LoRAWeights, strength: float) -> None:
    """Add a LoRA to ``patcher`` (a clone) as host patches, after checking that it fits."""
    lora.check_fits(patcher.model.module, weights)
    patched = patcher.add_patches(lora_patches(weights), strength)
    log.info("LoRA %s: %d layers as patches (strength %g)", weights.name, len(patched), strength)


class LastDiT:
    """The last DiT the loader made, kept until the host unloads it.

    The host's output cache forgets a loader's output when any of its inputs changes, LoRA
    strengths included, before the loader runs again; without this the 20 GB file would be read
    again for a strength change. One model at most is kept, and it is dropped when the host
    unloads it ("Unload models", or another model needing its memory) or another DiT replaces it.
    """

    _key: tuple | None = None
    _patcher = None

    @classmethod
    def key(cls, path: str, *options: object) -> tuple:
        stat = os.stat(path)
        return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, *options)

    @classmethod
    def get(cls, key: tuple):
        return cls._patcher if key == cls._key else None

    @classmethod
    def put(cls, key: tuple, patcher) -> None:
        cls._key, cls._patcher = key, patcher
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, cls._on_detach)

    @classmethod
    def _on_detach(cls, patcher, unpatch_all: bool) -> None:
        if unpatch_all and cls._patcher is not None and patcher.model is cls._patcher.model:
            cls._key = cls._patcher = None
