"""Euler/CFG sampler math with an analytic velocity model (a point-mass data distribution).

For data concentrated at x₀ the exact flow velocity is ``v = (x₀ − z)/σ``; the probability-flow
trajectories are straight lines, so Euler is exact and sampling must land on x₀. The model reads
its x₀ from the text features, which makes cond/uncond mix-ups and sign errors visible.
"""

from __future__ import annotations

import pytest
import torch

from mochi_core.sampling import (
    PREVIEW_RGB_BIAS,
    PREVIEW_RGB_FACTORS,
    latent_preview_rgb,
    sample,
)
from mochi_core.schedule import denoise_schedule, linear_quadratic_schedule
from mochi_core.text import TextConditioning

SHAPE = (1, 12, 2, 4, 6)


class PointMass:
    """v(z, σ) = (x₀ − z)/σ with x₀[b, c] = y_feat[b, 0, c] over the valid rows."""

    def __init__(self, supports_batched_text: bool = False):
        self.supports_batched_text = supports_batched_text
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma, y_feat, y_mask):
        self.calls.append((x.clone(), sigma.clone(), y_mask.clone()))
        x0 = y_feat[:, 0, :12].reshape(-1, 12, 1, 1, 1)
        return (x0 - x) / sigma.reshape(-1, 1, 1, 1, 1)


def cond(value: float, tokens: int = 3) -> TextConditioning:
    feats = torch.full((1, 8, 16), value)
    mask = torch.arange(8)[None] < tokens
    return TextConditioning(feats, mask)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_euler_lands_on_the_data_point():
    model = PointMass()
    z = sample(model, latents_or_shape=SHAPE, positive=cond(0.5), negative=None,
               sigmas=linear_quadratic_schedule(6), cfg=1.0, generator=gen())
    assert z.dtype == torch.float32 and z.shape == SHAPE
    torch.testing.assert_close(z, torch.full(SHAPE, 0.5), atol=1e-5, rtol=0)
    assert len(model.calls) == 6  # cfg 1: no uncond pass


def test_cfg_extrapolates_between_cond_and_uncond():
    # v̂ = v_u + s(v_c − v_u) is the exact velocity toward x_u + s(x_c − x_u)
    model = PointMass()
    z = sample(model, latents_or_shape=SHAPE, positive=cond(1.0), negative=cond(0.2),
               sigmas=linear_quadratic_schedule(5), cfg=3.0, generator=gen())
    torch.testing.assert_close(z, torch.full(SHAPE, 0.2 + 3.0 * 0.8), atol=1e-4, rtol=0)
    assert len(model.calls) == 10


def test_batched_cfg_equals_two_passes_and_orders_cond_first():
    kwargs = dict(latents_or_shape=SHAPE, positive=cond(1.0, tokens=5),
                  negative=cond(-1.0, tokens=1), sigmas=linear_quadratic_schedule(4), cfg=4.5)
    two = sample(PointMass(), generator=gen(), batch_cfg=False, **kwargs)
    model = PointMass(supports_batched_text=True)
    one = sample(model, generator=gen(), batch_cfg=None, **kwargs)  # auto -> batched
    torch.testing.assert_close(one, two, atol=1e-6, rtol=0)
    assert len(model.calls) == 4
    x, sigma, mask = model.calls[0]
    assert x.shape[0] == 2 and torch.equal(x[0], x[1]) and sigma.tolist() == [1.0, 1.0]
    assert mask.sum(1).tolist() == [5, 1]  # [cond, uncond], each with its own length


def test_auto_batch_cfg_off_without_support():
    model = PointMass(supports_batched_text=False)
    sample(model, latents_or_shape=SHAPE, positive=cond(1.0), negative=cond(0.0),
           sigmas=[1.0, 0.5, 0.0], cfg=2.0, generator=gen())
    assert [c[0].shape[0] for c in model.calls] == [1, 1, 1, 1]


def test_per_step_cfg_and_skip_at_one():
    model = PointMass()
    sample(model, latents_or_shape=SHAPE, positive=cond(1.0), negative=cond(0.0),
           sigmas=[1.0, 0.75, 0.5, 0.0], cfg=[2.0, 1.0, 3.0], generator=gen())
    assert len(model.calls) == 2 + 1 + 2


def test_euler_update_direction_and_first_step():
    # a constant velocity field: z_S = z_0 + Σ(σᵢ − σᵢ₊₁)·v = noise + v
    def const(x, sigma, y_feat, y_mask):
        return torch.ones_like(x)

    z = sample(const, latents_or_shape=SHAPE, positive=cond(0.0), negative=None,
               sigmas=[1.0, 0.6, 0.1, 0.0], cfg=1.0, generator=gen(3))
    noise = torch.randn(SHAPE, generator=gen(3), dtype=torch.float32)
    torch.testing.assert_close(z, noise + 1.0, atol=1e-6, rtol=0)


def test_noise_is_cpu_generator_noise_and_reproducible():
    model = PointMass()
    sample(model, latents_or_shape=SHAPE, positive=cond(0.0), negative=None,
           sigmas=[1.0, 0.0], cfg=1.0, generator=gen(11))
    expected = torch.randn(SHAPE, generator=gen(11), dtype=torch.float32)
    assert torch.equal(model.calls[0][0], expected)
    other = PointMass()
    sample(other, latents_or_shape=SHAPE, positive=cond(0.0), negative=None,
           sigmas=[1.0, 0.0], cfg=1.0, generator=gen(12))
    assert not torch.equal(other.calls[0][0], expected)


def test_denoise_starts_from_noised_latents():
    latents = torch.linspace(-1, 1, 12 * 2 * 4 * 6).reshape(SHAPE)
    sigmas = denoise_schedule(3, 0.5)
    model = PointMass()
    sample(model, latents_or_shape=latents, positive=cond(0.0), negative=None,
           sigmas=sigmas, cfg=1.0, generator=gen(5))
    noise = torch.randn(SHAPE, generator=gen(5), dtype=torch.float32)
    s0 = sigmas[0]
    torch.testing.assert_close(model.calls[0][0], s0 * noise + (1 - s0) * latents)
    assert model.calls[0][1].item() == pytest.approx(s0)


def test_callback_gets_x0_estimate_and_can_cancel():
    seen = []

    def callback(step, total, preview):
        seen.append((step, total))
        torch.testing.assert_close(preview, torch.full(SHAPE, 0.25), atol=1e-5, rtol=0)
        if step == 2:
            raise KeyboardInterrupt

    model = PointMass()
    with pytest.raises(KeyboardInterrupt):
        sample(model, latents_or_shape=SHAPE, positive=cond(0.25), negative=None,
               sigmas=linear_quadratic_schedule(5), cfg=1.0, generator=gen(), callback=callback)
    assert seen == [(1, 5), (2, 5)] and len(model.calls) == 2


def test_batch_of_latents_expands_single_prompt():
    model = PointMass()
    z = sample(model, latents_or_shape=(2, 12, 1, 2, 2), positive=cond(0.3), negative=cond(0.1),
               sigmas=[1.0, 0.5, 0.0], cfg=2.0, generator=gen())
    torch.testing.assert_close(z, torch.full((2, 12, 1, 2, 2), 0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigmas": [1.0]}, "at least 2"),
        ({"sigmas": [1.0, 1.0, 0.0]}, "decreasing"),
        ({"sigmas": [1.5, 0.0]}, r"\[0, 1\]"),
        ({"cfg": [1.0, 2.0]}, "3 steps"),
        ({"cfg": float("nan")}, "finite"),
        ({"negative": None}, "negative"),
        ({"latents_or_shape": (1, 4, 2, 4, 4)}, "12"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(latents_or_shape=SHAPE, positive=cond(0.0), negative=cond(0.0),
                sigmas=[1.0, 0.5, 0.2, 0.0], cfg=2.0, generator=gen())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample(PointMass(), **args)


def test_latent_preview_rgb_projection():
    z = torch.zeros(1, 12, 2, 3, 4)
    z[0, 7] = 1.0  # the dominant luminance channel
    z[0, 3, 1] = 2.0
    rgb = latent_preview_rgb(z, as_uint8=False)
    assert rgb.shape == (2, 3, 4, 3)
    f, b = torch.tensor(PREVIEW_RGB_FACTORS), torch.tensor(PREVIEW_RGB_BIAS)
    torch.testing.assert_close(rgb[0, 0, 0], ((f[7] + b + 1) / 2).clamp(0, 1))
    torch.testing.assert_close(rgb[1, 2, 3], ((f[7] + 2 * f[3] + b + 1) / 2).clamp(0, 1))
    u8 = latent_preview_rgb(z)
    assert u8.dtype == torch.uint8
    assert torch.equal(u8, (rgb * 255).round().to(torch.uint8))
    assert latent_preview_rgb(torch.full((12, 1, 1, 1), 100.0)).max() == 255


def test_real_dit_batched_cfg_matches_two_passes():
    """With the real AsymmDiT (demo weights): one [cond, uncond] batch with different text
    lengths (5 tokens vs a zeroed prompt) gives the two-pass result, and seeds reproduce."""
    from mochi_core.demo import random_dit_state_dict  # noqa: PLC0415
    from mochi_core.dit import AsymmDiT, DiTConfig  # noqa: PLC0415

    sd = random_dit_state_dict(1)
    dit = AsymmDiT(DiTConfig.from_state_dict(sd))
    dit.load_state_dict(sd)
    feats = torch.randn(1, 256, 64, generator=gen(2))
    pos = TextConditioning(feats, torch.arange(256)[None] < 5)
    neg = TextConditioning(torch.zeros(1, 256, 64), torch.zeros(1, 256, dtype=torch.bool))
    kwargs = dict(latents_or_shape=(1, 12, 2, 4, 4), positive=pos, negative=neg,
                  sigmas=linear_quadratic_schedule(3), cfg=4.5)
    two = sample(dit, generator=gen(9), batch_cfg=False, **kwargs)
    one = sample(dit, generator=gen(9), batch_cfg=True, **kwargs)
    torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)
    assert torch.equal(two, sample(dit, generator=gen(9), batch_cfg=False, **kwargs))
    noise = torch.randn((1, 12, 2, 4, 4), generator=gen(9))
    assert (two - noise).abs().mean() > 0.1  # the model moved the sample
