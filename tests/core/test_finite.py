"""NaN/Inf latents or pixels stop the run with the dtype and the remedy (no black frames),
and sampling is deterministic: the same seed gives bit-identical latents."""

from __future__ import annotations

import pytest
import torch

from mochi_core import vae_tiling
from mochi_core.demo import random_dit_state_dict
from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.finite import NonFiniteError
from mochi_core.sampling import sample
from mochi_core.schedule import linear_quadratic_schedule
from mochi_core.text import TextConditioning

SHAPE = (1, 12, 2, 4, 6)


def cond(width: int = 16, tokens: int = 3) -> TextConditioning:
    feats = torch.randn(1, 8, width, generator=torch.Generator().manual_seed(tokens))
    return TextConditioning(feats, torch.arange(8)[None] < tokens)


class Poisoned:
    """A velocity model in ``dtype`` whose output turns ``value`` (NaN/Inf) at call ``at``."""

    def __init__(self, at: int, value: float, dtype: torch.dtype) -> None:
        self.at, self.value, self.dtype, self.calls = at, value, dtype, 0

    def resolved_compute_dtype(self) -> torch.dtype:
        return self.dtype

    def __call__(self, x, sigma, y_feat, y_mask):
        self.calls += 1
        v = -x.to(self.dtype)
        if self.calls >= self.at:
            v[..., 0, 0] = self.value
        return v


def run(model, steps: int = 5, callback=None, seed: int = 7, cfg: float = 1.0) -> torch.Tensor:
    return sample(model, latents_or_shape=SHAPE, positive=cond(), negative=cond(tokens=1),
                  sigmas=linear_quadratic_schedule(steps), cfg=cfg,
                  generator=torch.Generator().manual_seed(seed), callback=callback)


def test_nan_in_fp16_names_the_step_the_dtype_and_the_remedy():
    previews = []
    with pytest.raises(NonFiniteError) as info:
        run(Poisoned(3, float("nan"), torch.float16), callback=lambda *a: previews.append(a[0]))
    message = str(info.value)
    assert "NaN at step 3 of 5 in float16" in message
    assert "use bf16 or fp32 weights / compute" in message
    assert isinstance(info.value, RuntimeError)
    assert previews == [1, 2], "the poisoned step must not reach the preview"


def test_inf_in_bf16_points_at_the_weights_not_the_precision():
    with pytest.raises(NonFiniteError, match=r"Inf at step 1 of 5 in bfloat16; the weights"):
        run(Poisoned(1, float("inf"), torch.bfloat16))


def test_finite_values_pass_and_cfg_mixing_inf_is_caught():
    assert torch.isfinite(run(Poisoned(99, float("nan"), torch.float32))).all()
    # cond and uncond both +Inf: v_u + s(v_c − v_u) = Inf − Inf = NaN after the CFG mix
    with pytest.raises(NonFiniteError, match=r"NaN at step 1 of 5 in float32"):
        run(Poisoned(1, float("inf"), torch.float32), cfg=4.5)


def tiny_dit(dtype: torch.dtype = torch.float32, compute: torch.dtype | None = None) -> AsymmDiT:
    sd = random_dit_state_dict(seed=0)
    model = AsymmDiT(DiTConfig.from_state_dict(sd), dtype=dtype, compute_dtype=compute)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_fp16_overflow_in_the_real_dit_is_reported():
    """An MLP weight ×1e4 overflows fp16 (max 65504) in the DiT; fp32 runs the same model."""
    model = tiny_dit(compute=torch.float16)
    with torch.no_grad():
        model.blocks[0].mlp_x.w1.weight.mul_(1e4)
    with pytest.raises(NonFiniteError, match=r"at step 1 of 2 in float16; use bf16 or fp32"):
        sample(model, latents_or_shape=SHAPE, positive=cond(64), negative=None,
               sigmas=linear_quadratic_schedule(2), cfg=1.0,
               generator=torch.Generator().manual_seed(0))
    model.compute_dtype = torch.float32
    z = sample(model, latents_or_shape=SHAPE, positive=cond(64), negative=None,
               sigmas=linear_quadratic_schedule(2), cfg=1.0,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(z).all()


def fake_decoder(value: float, dtype: torch.dtype):
    """A decoder stand-in: every output pixel is ``value`` in ``dtype``."""

    def decoder(z, cache):
        frames = 6 * z.shape[2] - 5 if not cache.__dict__.get("seen") else 6 * z.shape[2]
        cache.__dict__["seen"] = True
        return torch.full((z.shape[0], 3, frames, 8 * z.shape[3], 8 * z.shape[4]), value,
                          dtype=dtype)

    return decoder


def test_decoder_inf_in_fp16_names_the_dtype_and_the_remedy():
    z = torch.zeros(1, 12, 2, 3, 4, dtype=torch.float16)
    with pytest.raises(NonFiniteError) as info:
        vae_tiling.decode(fake_decoder(float("inf"), torch.float16), z, frames_per_chunk=1)
    assert "decoder output has Inf in float16: use fp32 or bf16 for the VAE" in str(info.value)
    ok = vae_tiling.decode(fake_decoder(0.5, torch.float16), z, frames_per_chunk=1)
    assert ok.shape == (1, 3, 7, 24, 32) and torch.equal(ok, torch.full_like(ok, 0.5))


class NaNEncoder:
    def check_pixels(self, pixels: torch.Tensor) -> None:
        pass

    def encode(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        b, _, f, h, w = x.shape
        return torch.full((b, 12, (f - 1) // 6 + 1, h // 8, w // 8), float("nan"), dtype=dtype)


def test_encoder_nan_is_refused():
    pixels = torch.zeros(1, 3, 7, 16, 16)
    with pytest.raises(NonFiniteError, match=r"encoder output has NaN in float16: use fp32"):
        vae_tiling.encode(NaNEncoder(), pixels, dtype=torch.float16)


# -- determinism --------------------------------------------------------------------------


def dit_run(model: AsymmDiT, seed: int) -> torch.Tensor:
    return sample(model, latents_or_shape=SHAPE, positive=cond(64, tokens=5),
                  negative=cond(64, tokens=0), sigmas=linear_quadratic_schedule(3), cfg=4.5,
                  generator=torch.Generator().manual_seed(seed))


def test_same_seed_gives_bit_identical_latents_and_another_seed_differs():
    model = tiny_dit()
    first, again = dit_run(model, 123), dit_run(tiny_dit(), 123)  # a fresh model, same file
    assert torch.equal(first, again)
    torch.manual_seed(999)  # the global RNG plays no part
    assert torch.equal(first, dit_run(model, 123))
    other = dit_run(model, 124)
    assert not torch.equal(first, other)
    assert (first - other).abs().mean() > 0.1, "another seed must change the whole video"
