"""Genmo fine-tuner LoRA files: loading, merging into a DiT, and exact removal (SPEC §2.1).

File format: for each adapted Linear ``<m>`` (``blocks.i.attn.qkv_x``, ``qkv_y``, ``proj_x``,
``proj_y``), ``<m>.lora_A`` of shape ``(r, in)`` and ``<m>.lora_B`` of shape ``(out, r)``, fp32.
Keys may carry a ``diffusion_model.`` or ``model.diffusion_model.`` prefix. The safetensors
metadata ``kwargs`` is the fine-tuner's JSON model kwargs: ``qkv_proj_lora_rank/alpha`` for the
qkv layers and ``out_proj_lora_rank/alpha`` for the output projections give the scale α/r. A
per-layer ``<m>.alpha`` scalar, if present, overrides it. Without either the scale is 1, as in
ComfyUI (equal to Genmo's default config, rank 16 and α 16).

Merging: ``W' = W + strength · scale · (B @ A)`` computed in fp32 and stored in the weight's
dtype. The original Parameter (and ``scale_weight``) objects are kept by the handle, so
``remove()`` restores them bit for bit.

fp8 storage (decision): an fp8 weight is *not* re-quantized after merging, because a LoRA delta
is usually smaller than fp8's rounding step (3 mantissa bits) and would mostly vanish. While
applied, the merged weight is kept in bf16 with its per-layer scale folded in (``scale_weight``
cleared); the fp8 original is restored by ``remove()``. The adapted layers therefore use
2 bytes/parameter plus their 1-byte fp8 backup while a LoRA is applied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mochi_core import ops
from mochi_core.safetensors_io import CheckpointError, load_tensors, read_header

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: Which metadata kwargs govern which layers (Genmo fine-tuner naming).
_KWARG_GROUPS = {"qkv_x": "qkv_proj", "qkv_y": "qkv_proj", "proj_x": "out_proj",
                 "proj_y": "out_proj"}  # fmt: skip


@dataclass(frozen=True)
class LoRALayer:
    """One adapted Linear: ``delta = scale · up @ down``."""

    down: torch.Tensor  # lora_A, (r, in)
    up: torch.Tensor  # lora_B, (out, r)
    scale: float = 1.0
    alpha: float | None = None  # the α of ``scale = α / r``; None when the scale is 1 by default

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return self.down.shape[0]

    def delta(self, strength: float = 1.0, device: torch.device | str | None = None
              ) -> torch.Tensor:
        """``strength · scale · up @ down`` in fp32, shape (out, in), computed on ``device``."""
        up, down = self.up.to(device=device, dtype=torch.float32), self.down.to(
            device=device, dtype=torch.float32)
        return (up @ down) * (strength * self.scale)


@dataclass
class LoRAWeights:
    """A LoRA: Genmo module path (e.g. ``blocks.3.attn.qkv_x``) -> :class:`LoRALayer`."""

    layers: dict[str, LoRALayer]
    name: str = "lora"
    metadata: dict[str, str] = field(default_factory=dict)


def _kwargs_from_metadata(metadata: Mapping[str, str]) -> dict:
    """The fine-tuner kwargs (possibly nested one level, e.g. under ``"kwargs"``), or {}."""
    try:
        kwargs = json.loads(metadata.get("kwargs", "{}"))
    except ValueError:
        log.warning("LoRA metadata 'kwargs' is not JSON; using scale 1")
        return {}
    if not isinstance(kwargs, dict):
        return {}
    nested = kwargs.get("kwargs")
    return {**kwargs, **nested} if isinstance(nested, dict) else kwargs


def _alpha_for(module: str, rank: int, kwargs: Mapping,
               alpha: torch.Tensor | None) -> float | None:
    """α from a per-layer alpha, else from the metadata kwargs of the layer's group, else None
    (scale 1)."""
    if alpha is not None:
        return float(alpha.float().reshape(()))
    group = _KWARG_GROUPS.get(module.rsplit(".", 1)[-1])
    value = kwargs.get(f"{group}_lora_alpha") if group else None
    if value is None:
        return None
    stated = kwargs.get(f"{group}_lora_rank")
    if stated is not None and int(stated) != rank:
        log.warning("%s: metadata rank %s but tensors have rank %d", module, stated, rank)
    return float(value)


def _strip(key: str) -> str:
    """``key`` without a ComfyUI diffusion-model prefix."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _pair_keys(keys: list[str], name: str) -> list[str]:
    """Module paths that have both ``lora_A`` and ``lora_B``; anything else is an error."""
    modules = {k.rsplit(".", 1)[0] for k in keys if k.endswith((".lora_A", ".lora_B"))}
    allowed = {f"{m}.{s}" for m in modules for s in ("lora_A", "lora_B", "alpha")}
    unknown = [k for k in keys if k not in allowed]
    unpaired = [m for m in modules if not {f"{m}.lora_A", f"{m}.lora_B"} <= set(keys)]
    if not modules or unknown or unpaired:
        hint = " (PEFT/diffusers-style LoRA keys are not supported)" if any(
            k.endswith((".lora_A.weight", ".lora_down.weight")) for k in keys) else ""
        raise CheckpointError(f"{name}: not a Genmo-format Mochi LoRA{hint}; unrecognised keys "
                              f"{sorted(unknown)[:5]}, unpaired {sorted(unpaired)[:5]}")
    return sorted(modules)


def lora_from_state_dict(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
    name: str = "lora",
) -> LoRAWeights:
    """Build :class:`LoRAWeights` from Genmo-format tensors (optionally prefixed)."""
    sd = {_strip(k): v for k, v in sd.items()}
    kwargs = _kwargs_from_metadata(metadata or {})
    layers = {}
    for module in _pair_keys(list(sd), name):
        down, up = sd[f"{module}.lora_A"], sd[f"{module}.lora_B"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{name}: {module} has lora_A {tuple(down.shape)} and lora_B "
                                  f"{tuple(up.shape)}; expected (r, in) and (out, r)")
        alpha = _alpha_for(module, down.shape[0], kwargs, sd.get(f"{module}.alpha"))
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        layers[module] = LoRALayer(down, up, scale, alpha)
    return LoRAWeights(layers, name, dict(metadata or {}))


def load_lora(path: str | Path) -> LoRAWeights:
    """Read a Genmo fine-tuner LoRA ``.safetensors`` (pickle files are refused)."""
    header = read_header(path)
    lora = lora_from_state_dict(load_tensors(path, header=header), header.metadata,
                                Path(path).name)
    log.info("%s: LoRA with %d layers", lora.name, len(lora.layers))
    return lora


@dataclass
class _Patch:
    """One patched layer: the original weight and scale, and the merged weight put in place."""

    weight: nn.Parameter
    scale: torch.Tensor | None
    merged: nn.Parameter


class LoRAHandle:
    """Undo record of :func:`apply_lora`; ``remove()`` puts the original tensors back."""

    def __init__(self, model: nn.Module, patches: dict[str, _Patch]) -> None:
        self._model = model
        self._patches = patches

    @property
    def layers(self) -> tuple[str, ...]:
        """Module paths that are currently patched."""
        return tuple(self._patches)

    def remove(self) -> None:
        """Restore the original weights (and fp8 scales) exactly. Idempotent.

        Stacked LoRAs must be removed in reverse order of application; removing one that is
        still covered by a later LoRA raises ``RuntimeError`` and changes nothing.
        """
        modules = {name: self._model.get_submodule(name) for name in self._patches}
        covered = [n for n, p in self._patches.items() if modules[n].weight is not p.merged]
        if covered:
            raise RuntimeError(f"LoRA layers {covered[:3]} were patched again after this LoRA; "
                               "remove the later LoRA first")
        for name, patch in self._patches.items():
            modules[name].weight = patch.weight
            if patch.scale is not None:
                modules[name].scale_weight = patch.scale
        self._patches = {}

    def __enter__(self) -> LoRAHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def check_fits(model: nn.Module, lora: LoRAWeights) -> None:
    """Every LoRA layer must name a Linear of the model with matching (out, in)."""
    modules = dict(model.named_modules())
    unmatched, wrong = [], []
    for name, layer in lora.layers.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            unmatched.append(name)
        elif tuple(module.weight.shape) != (layer.up.shape[0], layer.down.shape[1]):
            wrong.append(f"{name} lora {(layer.up.shape[0], layer.down.shape[1])} != "
                         f"model {tuple(module.weight.shape)}")
    if unmatched or wrong:
        raise CheckpointError(f"{lora.name}: LoRA does not fit this model (a LoRA for another "
                              f"model?); unmatched layers ({len(unmatched)}): {unmatched[:5]}; "
                              f"wrong shapes ({len(wrong)}): {wrong[:3]}")


def _merged(module: nn.Module, layer: LoRALayer, strength: float) -> torch.Tensor:
    """The merged weight in its storage dtype (bf16 for fp8 storage, scale folded in)."""
    weight = module.weight
    base = weight.float()
    scale = getattr(module, "scale_weight", None)
    if scale is not None:
        base = base * scale.float()
    delta = layer.delta(strength, weight.device)
    dtype = torch.bfloat16 if weight.dtype in ops.FP8_DTYPES else weight.dtype
    return (base + delta).to(dtype)


def apply_lora(model: nn.Module, lora: LoRAWeights, strength: float = 1.0) -> LoRAHandle:
    """Merge ``lora`` into ``model``'s weights; returns a handle whose ``remove()`` undoes it.

    Nothing is modified if any LoRA layer does not fit the model.
    """
    check_fits(model, lora)
    patches: dict[str, _Patch] = {}
    with torch.no_grad():
        for name, layer in lora.layers.items():
            module = model.get_submodule(name)
            merged = nn.Parameter(_merged(module, layer, strength), requires_grad=False)
            patches[name] = _Patch(module.weight, getattr(module, "scale_weight", None), merged)
            module.weight = merged
            if patches[name].scale is not None:
                module.scale_weight = None
    log.info("applied LoRA %s to %d layers (strength %g)", lora.name, len(patches), strength)
    return LoRAHandle(model, patches)
