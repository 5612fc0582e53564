"""Refuse NaN/Inf latents and pixels with a message that names the dtype and the remedy.

Half precision overflows in the DiT or the VAE (fp16 has a range of ±65504) turn a whole video
into NaN, which a saver would otherwise write as black frames. The sampler checks its velocity
once per step and the VAE checks its output once per call: one ``torch.isfinite(...).all()``
each, a reduction that costs far less than the step or the decode it follows.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16,)


class NonFiniteError(RuntimeError):
    """A model produced NaN or Inf values; the message names the dtype and the remedy."""


def describe_dtype(dtype: torch.dtype | None) -> str:
    """``torch.float16`` → ``"float16"`` (``"unknown dtype"`` for None)."""
    return "unknown dtype" if dtype is None else str(dtype).removeprefix("torch.")


def kind(tensor: torch.Tensor) -> str:
    """``"NaN"``, ``"Inf"`` or ``"NaN and Inf"``: what the non-finite values are."""
    nan, inf = bool(torch.isnan(tensor).any()), bool(torch.isinf(tensor).any())
    return "NaN and Inf" if nan and inf else ("NaN" if nan else "Inf")


def dit_remedy(dtype: torch.dtype | None) -> str:
    """What to change when the DiT computed in ``dtype`` produced non-finite values."""
    if dtype in HALF_DTYPES:
        return "use bf16 or fp32 weights / compute (fp16 overflows in the DiT)"
    return ("the weights or the inputs hold NaN/Inf: check the checkpoint file (and the "
            "input latents for video-to-video)")


def vae_remedy(dtype: torch.dtype | None) -> str:
    """What to change when the VAE computed in ``dtype`` produced non-finite values."""
    if dtype in HALF_DTYPES:
        return "use fp32 or bf16 for the VAE (fp16 overflows in the VAE)"
    return "the VAE weights or the latents hold NaN/Inf: check the VAE file and the latents"


def check_dit_step(v: torch.Tensor, step: int, steps: int, dtype: torch.dtype | None) -> None:
    """Raise :class:`NonFiniteError` when the guided velocity of ``step`` (1-based) is not
    finite."""
    if bool(torch.isfinite(v).all()):
        return
    message = (f"the DiT produced {kind(v)} at step {step} of {steps} in "
               f"{describe_dtype(dtype)}; {dit_remedy(dtype)}")
    log.error(message)
    raise NonFiniteError(message)


def check_vae_output(x: torch.Tensor, what: str, dtype: torch.dtype | None) -> None:
    """Raise :class:`NonFiniteError` when the VAE ``what`` ("decoder output", ...) is not finite."""
    if bool(torch.isfinite(x).all()):
        return
    message = f"VAE {what} has {kind(x)} in {describe_dtype(dtype)}: {vae_remedy(dtype)}"
    log.error(message)
    raise NonFiniteError(message)
