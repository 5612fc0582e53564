"""Attention backends for the joint visual/text attention of the DiT.

Every backend is an :data:`AttentionFn` ``(q, k, v, valid) -> out``:

* ``q``, ``k``, ``v``: ``B × heads × S × D``, all in the same dtype and on the same device;
* ``valid``: ``B × S`` bool, ``True`` for real tokens, or ``None`` when every token is real;
* ``out``: ``B × heads × S × D``. Invalid keys are never attended; the output rows of invalid
  queries are finite but otherwise unspecified (zeros for the packing backends).

Backends by name:

``"sdpa"``
    :func:`torch.nn.functional.scaled_dot_product_attention`. With a ``valid`` mask: on the CPU
    one masked call; on a GPU each sample runs unmasked on its valid tokens, since a mask rules
    out SDPA's flash kernel (:func:`sdpa_per_sample`, the same math).
``"flash"``
    ``flash_attn``: dense ``flash_attn_func`` without a mask; with one, ``flash_attn_varlen_func``
    over the valid tokens of the whole batch packed into one sequence with ``cu_seqlens``
    (fp16/bf16 kernels).
``"sage"``
    ``sageattention.sageattn``: no masks, so a ragged batch is run sample by sample (see
    :func:`attend`).

flash and sage run only on CUDA tensors of a GPU with compute capability 8.0 or newer; any other
call (CPU tensors under ComfyUI ``--cpu``, an older GPU) runs sdpa, with the reason logged once.

Whether a backend accepts a ragged batch in one call is recorded in
:attr:`AttentionBackend.ragged_batch`; :func:`attend` loops over the samples for the ones that
do not (and for plain callables that do not declare ``ragged_batch = True``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

log = logging.getLogger(__name__)

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor
]
"""``(q, k, v, valid) -> out``; q/k/v/out ``B × heads × S × D``, valid ``B × S`` bool or None."""

BACKEND_NAMES = ("sdpa", "flash", "sage")

_PACKAGES = {"flash": "flash_attn", "sage": "sageattention"}
#: The oldest CUDA compute capability of the kernels each package ships: FlashAttention 2 and
#: SageAttention 2 need Ampere (sm80) or newer.
_MIN_CAPABILITY = {"flash": (8, 0), "sage": (8, 0)}


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention function.

    Attributes:
        name: ``"sdpa"``, ``"flash"`` or ``"sage"``.
        fn: the :data:`AttentionFn`.
        ragged_batch: ``True`` when ``fn`` handles ``B > 1`` with a ``valid`` mask in one call.
    """

    name: str
    fn: AttentionFn
    ragged_batch: bool

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the backend; see :data:`AttentionFn`."""
        return self.fn(q, k, v, valid)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Torch SDPA over ``B × heads × S × D``; invalid keys (``valid`` False) are never attended.

    On the CPU a ``valid`` mask becomes one boolean key mask (measured as fast as per-sample
    calls there). On any other device a mask would rule out the flash kernel, so each sample
    runs unmasked on its own valid tokens (:func:`sdpa_per_sample`).
    """
    if valid is None:
        return F.scaled_dot_product_attention(q, k, v)
    if q.device.type != "cpu":
        return sdpa_per_sample(q, k, v, valid)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])


def sdpa_per_sample(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Unmasked SDPA per sample over its valid tokens; the rows of invalid tokens are zero.

    The same math as the masked call: softmax over the valid keys only. Valid prefixes (the
    DiT's [visual, text, padding] layout) are slices, so nothing is gathered; other patterns
    are gathered and scattered back.
    """
    lengths = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device) < lengths[:, None]
    if torch.equal(prefix, valid):
        index = [slice(0, n) for n in lengths.tolist()]  # one host sync for the batch
    else:
        index = [row.nonzero().squeeze(1) for row in valid]
    out = torch.zeros_like(q)
    for b, tokens in enumerate(index):
        sample = [t[b : b + 1, :, tokens] for t in (q, k, v)]
        out[b : b + 1, :, tokens] = F.scaled_dot_product_attention(*sample)
    return out


def _half_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the fp16/bf16-only kernels run ``t`` in: its own, or bf16 for fp32."""
    return t.dtype if t.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """flash_attn over ``B × heads × S × D`` inputs: varlen over the valid tokens of a mask.

    Without a mask the dense ``flash_attn_func`` runs on ``B × S × heads × D`` views (no packing
    copies). With one, the valid tokens of all samples are packed into one ``total × heads × D``
    sequence with cumulative lengths ``cu_seqlens`` (``B + 1``, int32); the output is scattered
    back and the rows of invalid tokens are zero. fp32 inputs run in bf16 (flash_attn has no
    fp32 kernel).
    """
    flash_attn = importlib.import_module("flash_attn")
    run_dtype = _half_dtype(q)
    if valid is None:
        dense = [t.transpose(1, 2).to(run_dtype) for t in (q, k, v)]  # (B, S, heads, D)
        return flash_attn.flash_attn_func(*dense).transpose(1, 2).to(q.dtype)
    B, _, S, _ = q.shape
    lengths = valid.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())
    index = valid.flatten().nonzero().squeeze(1)  # (total,)

    def pack(t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b h s d -> (b s) h d")[index].to(run_dtype)

    packed = flash_attn.flash_attn_varlen_func(
        pack(q), pack(k), pack(v), cu_seqlens, cu_seqlens, max_len, max_len
    )  # (total, heads, D)
    out = q.new_zeros(B * S, q.shape[1], q.shape[3])
    out[index] = packed.to(q.dtype)
    return rearrange(out, "(b s) h d -> b h s d", b=B)


def _sage(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """SageAttention over ``B × heads × S × D`` (no masks: ``valid`` must be None).

    fp32 inputs run in bf16 (SageAttention has fp16/bf16 kernels only).
    """
    if valid is not None:
        raise ValueError("sage attention takes no mask; run ragged batches with attend()")
    sageattention = importlib.import_module("sageattention")
    run_dtype = _half_dtype(q)
    out = sageattention.sageattn(
        q.to(run_dtype), k.to(run_dtype), v.to(run_dtype), tensor_layout="HND", is_causal=False
    )
    return out.to(q.dtype)


def _unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all, or None when it may.

    Whether it runs on given tensors is decided per call from their device
    (:func:`device_reason`).
    """
    if name == "sdpa":
        return None
    package = _PACKAGES[name]
    try:
        importlib.import_module(package)
    except ImportError:
        return f"the package {package!r} is not installed"
    if not torch.cuda.is_available():
        return f"{package!r} needs a CUDA device and none is available"
    return None


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (always includes ``"sdpa"``)."""
    return [name for name in BACKEND_NAMES if _unavailable_reason(name) is None]


def device_reason(name: str, device: torch.device) -> str | None:
    """Why kernel backend ``name`` (flash or sage) cannot run on tensors on ``device``, or None.

    CPU (ComfyUI ``--cpu`` on a CUDA machine) and other non-CUDA tensors never go to the
    kernels, nor do CUDA tensors on a GPU older than :data:`_MIN_CAPABILITY`.
    """
    package = _PACKAGES[name]
    if device.type != "cuda":
        return f"{package!r} runs on CUDA tensors only; these are on {device.type!r}"
    have = tuple(torch.cuda.get_device_capability(device))
    need = _MIN_CAPABILITY[name]
    if have < need:
        return (f"{package!r} needs compute capability {need[0]}.{need[1]} or newer; "
                f"{device} has {have[0]}.{have[1]}")  # fmt: skip
    return None


@functools.cache
def _warn_fallback(name: str, reason: str) -> None:
    """Log once per backend and reason that a call ran on sdpa instead."""
    log.warning("attention backend %r cannot run here (%s); using 'sdpa' instead", name, reason)


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """:func:`_flash_varlen` where the tensors' device can run it, else sdpa with the same
    output contract (rows of invalid tokens zero)."""
    reason = device_reason("flash", q.device)
    if reason is None:
        return _flash_varlen(q, k, v, valid)
    _warn_fallback("flash", reason)
    return sdpa_attention(q, k, v, None) if valid is None else sdpa_per_sample(q, k, v, valid)


def _sage_or_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """:func:`_sage` where the tensors' device can run it, else sdpa."""
    reason = device_reason("sage", q.device)
    if reason is None:
        return _sage(q, k, v, valid)
    _warn_fallback("sage", reason)
    return sdpa_attention(q, k, v, valid)


_SDPA = AttentionBackend("sdpa", sdpa_attention, ragged_batch=True)
_FLASH = AttentionBackend("flash", _flash, ragged_batch=True)
_SAGE = AttentionBackend("sage", _sage_or_sdpa, ragged_batch=False)


def get_attention(name: str) -> AttentionBackend:
    """The backend called ``name``; falls back to sdpa (with a warning) when it cannot run here.

    Raises:
        ValueError: for a name that is not one of :data:`BACKEND_NAMES`.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(BACKEND_NAMES)}")
    reason = _unavailable_reason(name)
    if reason is not None:
        log.warning("attention backend %r unavailable (%s); falling back to 'sdpa'", name, reason)
        return _SDPA
    return {"sdpa": _SDPA, "flash": _FLASH, "sage": _SAGE}[name]


def attend(
    fn: AttentionFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Run ``fn`` on ``B × heads × S × D`` inputs, looping per sample when it must.

    A backend (or any callable) that does not declare ``ragged_batch = True`` never sees a mask:
    each sample's valid tokens are gathered, attended without a mask and scattered back (other
    rows are zero). With ``valid=None`` or ``B == 1`` and all tokens valid, ``fn`` is called once.
    """
    if valid is None or getattr(fn, "ragged_batch", False):
        return fn(q, k, v, valid)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        index = valid[b].nonzero().squeeze(1)
        sample = [t[b : b + 1, :, index] for t in (q, k, v)]
        out[b : b + 1, :, index] = fn(*sample, None)
    return out
