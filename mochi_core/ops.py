"""Layer factories for the Mochi models.

Every model constructor in ``mochi_core`` takes an ``operations`` namespace and builds its
layers through it (``operations.Linear(...)``, ``operations.Conv3d(...)``, ...). The host
application can pass its own namespace (for example one that offloads or quantises), and the
models never import the host.

Besides the layers, a namespace may provide ``Weight`` (:class:`Weight`): a module that only
holds a tensor the model uses in its own math, so that the host can place and cast it too.

The default namespace, :data:`cast`, stores weights in whatever dtype they were loaded in
(fp32, bf16, fp16 or fp8) and casts them to the dtype and device of the input at compute time,
layer by layer. A Linear loaded from a "scaled fp8" checkpoint also carries ``scale_weight``, a
per-layer scalar that multiplies the cast weight.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)


def cast_like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` on the device and in the dtype of ``x`` (no copy when it already is)."""
    if t is None:
        return None
    return t.to(device=x.device, dtype=x.dtype, non_blocking=True)


class Linear(nn.Linear):
    """``nn.Linear`` whose stored weight is cast to the input's dtype and device per call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = cast_like(self.weight, x)
        if self.scale_weight is not None:
            weight = weight * cast_like(self.scale_weight, x)
        return F.linear(x, weight, cast_like(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, cast_like(self.weight, x), cast_like(self.bias, x))


class Conv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, cast_like(self.weight, x), cast_like(self.bias, x))


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x, self.num_groups, cast_like(self.weight, x), cast_like(self.bias, x), self.eps
        )


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, cast_like(self.weight, x), cast_like(self.bias, x), self.eps
        )


class Weight(nn.Module):
    """A module that holds one learned tensor, ``weight``, used by its owner's own math (the
    QK-norm scales, the RoPE frequencies) rather than by a layer.

    Keeping such a tensor in a leaf module of its own, made through ``operations``, lets a host
    place, offload and cast it like any layer weight. ``weight(device, dtype)`` returns it on
    ``device`` in ``dtype`` (no copy when it already is). It starts filled with ``fill``.
    """

    def __init__(self, shape: tuple[int, ...], device=None, dtype=None, fill: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full(shape, fill, device=device, dtype=dtype))

    def forward(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(device=device, dtype=dtype)


#: The default operations: weights stay in their stored dtype and are cast at compute time.
cast = SimpleNamespace(
    Linear=Linear, Conv2d=Conv2d, Conv3d=Conv3d, GroupNorm=GroupNorm, LayerNorm=LayerNorm,
    Weight=Weight,
)


def weight_factory(operations) -> type[nn.Module]:
    """``operations.Weight``, or :class:`Weight` for a namespace that has none (e.g. a host's
    own layer set, which knows only the usual layers)."""
    return getattr(operations, "Weight", Weight)
