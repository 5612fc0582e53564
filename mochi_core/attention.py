"""Attention backends for the joint visual/text attention of the DiT.

Every backend is an :data:`AttentionFn` ``(q, k, v, valid) -> out``:

* ``q``, ``k``, ``v``: ``B × heads × S × D``, all in the same dtype and on the same device;
* ``valid``: ``B × S`` bool, ``True`` for real tokens, or ``None`` when every token is real;
* ``out``: ``B × heads × S × D``. Invalid keys are never attended; the output rows of invalid
  queries are finite but otherwise unspecified (zeros for the packing backends).

Backends by name:

``"sdpa"``
    :func:`torch.nn.functional.scaled_dot_product_attention`; a ``valid`` mask becomes a boolean
    key mask, so a batch whose samples have different text lengths runs in one call.
``"flash"``
    ``flash_attn_varlen_func``: the valid tokens of the whole batch are packed into one sequence
    with ``cu_seqlens``, so ragged batches run in one call (CUDA, fp16/bf16 only).
``"sage"``
    ``sageattention.sageattn``: no masks, so a ragged batch is run sample by sample (see
    :func:`attend`).

Whether a backend accepts a ragged batch in one call is recorded in
:attr:`AttentionBackend.ragged_batch`; :func:`attend` loops over the samples for the ones that
do not (and for plain callables that do not declare ``ragged_batch = True``).
"""

from __future__ import annotations

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
    """Torch SDPA over ``B × heads × S × D``; invalid keys (``valid`` False) are masked out."""
    if valid is None:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])


def _half_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the fp16/bf16-only kernels run ``t`` in: its own, or bf16 for fp32."""
    return t.dtype if t.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """flash_attn varlen over the valid tokens of ``B × heads × S × D`` inputs.

    The valid tokens of all samples are packed into one ``total × heads × D`` sequence with
    cumulative lengths ``cu_seqlens`` (``B + 1``, int32); the output is scattered back and the
    rows of invalid tokens are zero. fp32 inputs run in bf16 (flash_attn has no fp32 kernel).
    """
    flash_attn = importlib.import_module("flash_attn")
    B, _, S, _ = q.shape
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=q.device)
    run_dtype = _half_dtype(q)
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
    """Why backend ``name`` cannot run here, or None when it can."""
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


_SDPA = AttentionBackend("sdpa", sdpa_attention, ragged_batch=True)
_FLASH = AttentionBackend("flash", _flash_varlen, ragged_batch=True)
_SAGE = AttentionBackend("sage", _sage, ragged_batch=False)


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
