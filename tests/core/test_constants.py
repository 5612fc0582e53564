"""The VAE latent statistics and the preview projection (SPEC §3.5, §8.21) against the two
independent copies of them: the host's ``comfy.latent_formats.Mochi`` and diffusers'
``AutoencoderKLMochi`` defaults. A change in any digit of ours fails here; the parity tests do not
see the statistics (both sides of a decode comparison take the same latents)."""

from __future__ import annotations

import inspect

import torch

from mochi_core import sampling, vae
from tests.conftest import import_host


def host_format():
    import_host()
    from comfy import latent_formats  # noqa: PLC0415

    return latent_formats.Mochi()


def diffusers_defaults() -> dict:
    from diffusers import AutoencoderKLMochi  # noqa: PLC0415

    params = inspect.signature(AutoencoderKLMochi.__init__).parameters
    return {name: params[name].default for name in ("latents_mean", "latents_std")}


def test_latent_statistics_are_genmos_to_the_last_digit():
    host, theirs = host_format(), diffusers_defaults()
    assert vae.LATENT_MEAN == tuple(theirs["latents_mean"])
    assert vae.LATENT_STD == tuple(theirs["latents_std"])
    # the host keeps them as fp32 tensors: equal once ours are rounded the same way
    assert torch.equal(torch.tensor(vae.LATENT_MEAN), host.latents_mean.flatten())
    assert torch.equal(torch.tensor(vae.LATENT_STD), host.latents_std.flatten())


def test_the_dit_space_maps_are_the_hosts():
    host = host_format()
    z = torch.randn(1, 12, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(vae.vae_to_dit_latents(z), host.process_in(z), rtol=0, atol=1e-6)
    assert torch.allclose(vae.dit_to_vae_latents(z), host.process_out(z), rtol=0, atol=1e-6)


def test_the_preview_projection_is_the_hosts():
    host = host_format()
    assert [list(row) for row in sampling.PREVIEW_RGB_FACTORS] == host.latent_rgb_factors
    assert list(sampling.PREVIEW_RGB_BIAS) == host.latent_rgb_factors_bias
