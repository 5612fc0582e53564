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

:data:`fp8_fast` differs in one layer: a Linear whose weight is stored in ``float8_e4m3fn``
multiplies in fp8 (``torch._scaled_mm``, twice the bf16 rate on Ada and Hopper GPUs) instead of
casting its weight up. Its input is quantized per call with a per-tensor scale taken from the
input's largest magnitude (so no activation is clipped and small ones keep the mantissa bits),
the weight is used as stored with its ``scale_weight``, and the product is accumulated in fp32 and
returned in the input's dtype. Where ``_scaled_mm`` cannot run (a GPU older than sm89, a torch
without it, a weight in another dtype, a width not a multiple of 16) the layer casts as
:data:`cast` does, and says why once in the log.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# fp8 fast mode

#: The fp8 format the fast Linear multiplies in (weights in another dtype are cast instead).
FP8_COMPUTE = getattr(torch, "float8_e4m3fn", None)
#: ``_scaled_mm`` takes inner and output widths that are multiples of this.
_FP8_ALIGN = 16
#: The oldest CUDA compute capability with fp8 tensor cores (Ada, sm89).
_FP8_MIN_CAPABILITY = (8, 9)


def _probe(device_type: str) -> str | None:
    """Why a tiny ``_scaled_mm`` fails on ``device_type`` (CPU), or None when it runs."""
    try:
        a = torch.zeros(16, 16, device=device_type).to(FP8_COMPUTE)
        one = torch.ones((), device=device_type)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return f"torch._scaled_mm does not run on {device_type!r} ({str(err)[:120]})"
    return None


@functools.cache
def fp8_compute_problem(device: torch.device) -> str | None:
    """Why fp8 matmuls cannot run on ``device``, or None when they can; decided once per device
    (every fast layer asks at every call).

    CUDA devices need compute capability 8.9 or newer; other devices (the CPU) are probed with a
    tiny ``torch._scaled_mm``.
    """
    if FP8_COMPUTE is None or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no float8_e4m3fn matmul"
    if device.type == "cuda":
        have = tuple(torch.cuda.get_device_capability(device))
        if have < _FP8_MIN_CAPABILITY:
            return (f"fp8 matmuls need compute capability 8.9 or newer; {device} has "
                    f"{have[0]}.{have[1]}")  # fmt: skip
        return None
    return _probe(device.type)


@functools.cache
def _warn_cast(reason: str) -> None:
    log.warning("fp8 fast mode: a Linear casts its weight instead (%s)", reason)


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``x`` in :data:`FP8_COMPUTE` with one fp32 scale, ``q * scale ≈ x``, the
    largest magnitude mapped to the format's largest value (no clipping, no host sync).

    The division runs in ``x``'s dtype (no fp32 copy of the activations), so the scale is
    rounded to that dtype first and returned as rounded: the matmul then undoes exactly the
    scale that was applied."""
    limit = torch.finfo(FP8_COMPUTE).max
    tiny = torch.finfo(x.dtype).tiny
    scale = (x.detach().abs().amax().float() / limit).clamp(min=tiny).to(x.dtype)
    return (x / scale).clamp(-limit, limit).to(FP8_COMPUTE), scale.float()


class FastFp8Linear(Linear):
    """:class:`Linear` that multiplies an ``float8_e4m3fn`` weight in fp8 (see the module)."""

    def _cast_reason(self, x: torch.Tensor) -> str | None:
        """None when this call multiplies in fp8; else why it casts ("" for a layer that is not
        stored in fp8, which casts in every mode and needs no word)."""
        if self.weight.dtype not in FP8_DTYPES:
            return ""
        if self.weight.dtype != FP8_COMPUTE:
            return f"its weight is {self.weight.dtype}; fp8 matmuls take {FP8_COMPUTE}"
        if self.in_features % _FP8_ALIGN or self.out_features % _FP8_ALIGN:
            return (f"its {self.in_features} x {self.out_features} weight is not a multiple of "
                    f"{_FP8_ALIGN} wide")  # fmt: skip
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"its input is {x.dtype}"
        return fp8_compute_problem(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (reason := self._cast_reason(x)) is not None:
            if reason:
                _warn_cast(reason)
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        q, scale_x = quantize_per_tensor(rows)
        weight = self.weight.to(x.device, non_blocking=True)
        scale_w = (torch.ones((), device=x.device) if self.scale_weight is None
                   else self.scale_weight.to(x.device, torch.float32))  # fmt: skip
        # _scaled_mm fuses a bias of the output's half dtype; an fp32 output adds it after.
        fused = x.dtype != torch.float32 and self.bias is not None
        out = torch._scaled_mm(q, weight.t(), scale_a=scale_x, scale_b=scale_w,
                               bias=cast_like(self.bias, x) if fused else None,
                               out_dtype=x.dtype)  # fmt: skip
        if self.bias is not None and not fused:
            out = out + cast_like(self.bias, x)
        return out.reshape(*x.shape[:-1], self.out_features)


#: The fp8 fast operations: as :data:`cast`, with :class:`FastFp8Linear`.
fp8_fast = SimpleNamespace(**{**vars(cast), "Linear": FastFp8Linear})
