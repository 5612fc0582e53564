"""The causal video VAE on its own: key layout, shapes, causality, Fourier features, errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mochi_core import ops
from mochi_core.vae import (
    LATENT_MEAN,
    LATENT_STD,
    Decoder,
    DecoderConfig,
    Encoder,
    EncoderConfig,
    add_fourier_features,
    decoded_frames,
    dit_to_vae_latents,
    latent_frames,
    vae_to_dit_latents,
)
from tests.conftest import KEYS_DIR
from tests.oracles_vae import (
    SMALL_ENCODER,
    TINY_DECODER,
    random_decoder_state_dict,
    random_encoder_state_dict,
)

TINY_ENCODER = EncoderConfig(channels=(32, 64, 64, 64), num_res_blocks=(1, 1, 1, 1, 1))


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in (KEYS_DIR / name).read_text().splitlines() if line)
    return {key: tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
            for key, shape in rows}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    model = Decoder(TINY_DECODER)
    model.load_state_dict(random_decoder_state_dict(TINY_DECODER, torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    model = Encoder(TINY_ENCODER)
    model.load_state_dict(random_encoder_state_dict(TINY_ENCODER, torch.Generator().manual_seed(2)))
    return model.eval()


@pytest.mark.parametrize(
    ("model", "manifest", "params"),
    [
        (Decoder, "genmo_decoder_keys.tsv", 362_526_595),
        (Encoder, "genmo_encoder_keys.tsv", 97_222_016),
    ],
)
def test_full_size_modules_have_genmos_keys_and_shapes(model, manifest, params):
    built = model(device="meta")
    assert _shapes(built) == _manifest(manifest)
    assert sum(p.numel() for p in built.parameters()) == params


def test_configs_are_inferred_from_state_dicts():
    assert DecoderConfig.from_state_dict(Decoder(device="meta").state_dict()) == DecoderConfig()
    assert EncoderConfig.from_state_dict(Encoder(device="meta").state_dict()) == EncoderConfig()
    odd = DecoderConfig(channels=(32, 64, 96, 128), num_res_blocks=(1, 2, 3, 2, 1))
    prefixed = {f"decoder.{k}": v for k, v in Decoder(odd, device="meta").state_dict().items()}
    assert DecoderConfig.from_state_dict(prefixed, prefix="decoder.") == odd
    odd_enc = EncoderConfig(channels=(32, 64, 96, 128), num_res_blocks=(2, 1, 3, 1, 2),
                            attention=(False, True, False, True, True))
    assert EncoderConfig.from_state_dict(Encoder(odd_enc, device="meta").state_dict()) == odd_enc
    with pytest.raises(KeyError, match="blocks.0.0.weight"):
        DecoderConfig.from_state_dict({"output_proj.weight": torch.zeros(3, 32)})


@pytest.mark.parametrize("latent_t", [1, 2, 3, 4])
def test_decoder_gives_6t_minus_5_frames_at_8x(decoder, latent_t):
    z = torch.randn(1, 12, latent_t, 2, 3)
    with torch.no_grad():
        out = decoder(z)
    assert out.shape == (1, 3, 6 * latent_t - 5, 16, 24) == (1, 3, decoded_frames(latent_t), 16, 24)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(("frames", "latent_t"), [(1, 1), (7, 2), (13, 3)])
def test_encoder_gives_k_plus_1_latent_frames(encoder, frames, latent_t):
    pixels = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = encoder.encode_distribution(pixels)
        assert torch.equal(encoder.encode(pixels), mean)
    assert mean.shape == logvar.shape == (2, 12, latent_t, 2, 3)
    assert latent_frames(frames) == latent_t


def test_decoder_is_causal(decoder):
    """A change in latent frame 2 leaves pixel frames 0..6 bit-identical and changes frame 7+."""
    z = torch.randn(1, 12, 4, 2, 2)
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = decoder(z), decoder(z2)
    first_affected = decoded_frames(2)  # frames 0..6 come from latent frames 0 and 1
    assert torch.equal(a[:, :, :first_affected], b[:, :, :first_affected])
    per_frame = (a[:, :, first_affected:] - b[:, :, first_affected:]).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame.min() > 0


def test_encoder_is_causal(encoder):
    """Pixel frames 7..12 feed only latent frame 2 (causal convs and causal attention)."""
    pixels = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    changed = pixels.clone()
    changed[:, :, 7:] = -changed[:, :, 7:]
    with torch.no_grad():
        a, b = encoder.encode(pixels), encoder.encode(changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-3


def test_fourier_features_values_and_fp32_requirement():
    x = torch.rand(1, 3, 2, 4, 4) * 2 - 1
    f = add_fourier_features(x)
    assert f.shape == (1, 15, 2, 4, 4) and f.dtype == torch.float32
    assert torch.equal(f[:, :3], x)
    # channel-major: [x, sin(c0·2⁶2π), sin(c0·2⁷2π), sin(c1·2⁶2π), …, cos(…)]
    for c in range(3):
        for j, exponent in enumerate((6, 7)):
            h = x[:, c].double() * (2.0**exponent * 2 * math.pi)
            sin, cos = f[:, 3 + 2 * c + j].double(), f[:, 9 + 2 * c + j].double()
            assert (sin - torch.sin(h)).abs().max() < 2e-4  # fp32 phase of up to 2⁷·2π
            assert (cos - torch.cos(h)).abs().max() < 2e-4
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        with pytest.raises(AssertionError, match="fp32"):
            add_fourier_features(x.to(dtype))


def test_latent_normalisation_uses_genmos_statistics_and_round_trips():
    assert len(LATENT_MEAN) == len(LATENT_STD) == 12
    assert LATENT_MEAN[7] == -0.09346305707025976 and LATENT_STD[7] == 1.3720942357788521
    mean = torch.tensor(LATENT_MEAN).view(1, 12, 1, 1, 1).expand(2, 12, 3, 4, 4)
    assert vae_to_dit_latents(mean).abs().max() < 1e-7
    z = torch.randn(2, 12, 3, 4, 4)
    dit = vae_to_dit_latents(z)
    assert torch.allclose(dit[:, 7], (z[:, 7] - LATENT_MEAN[7]) / LATENT_STD[7], atol=1e-6)
    assert (dit_to_vae_latents(dit) - z).abs().max() < 1e-6
    half = dit_to_vae_latents(dit.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16


def test_clear_errors_on_bad_shapes(decoder, encoder):
    with pytest.raises(ValueError, match="6k\\+1"):
        encoder.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        encoder.encode(torch.zeros(1, 3, 7, 20, 16))
    with pytest.raises(ValueError, match="pixels B × 3"):
        encoder.encode(torch.zeros(1, 4, 7, 16, 16))
    with pytest.raises(ValueError, match="B × 12 × T"):
        decoder(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="B × 12 × T"):
        decoder(torch.zeros(12, 2, 4, 4))
    with pytest.raises(ValueError, match="multiples of 32"):
        Decoder(DecoderConfig(channels=(16, 32, 64, 96)), device="meta")


def test_layers_come_from_operations_and_weights_are_cast_at_compute_time():
    made: list[str] = []

    def tracked(base):
        class Tracked(base):
            def __init__(self, *args, **kwargs):
                made.append(base.__name__)
                super().__init__(*args, **kwargs)
        return Tracked

    names = ("Linear", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")
    operations = SimpleNamespace(**{n: tracked(getattr(ops.cast, n)) for n in names})
    model = Decoder(TINY_DECODER, operations=operations, dtype=torch.bfloat16)
    expected = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.GroupNorm))
                   for m in model.modules())
    assert len(made) == expected
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.load_state_dict(random_decoder_state_dict(TINY_DECODER, torch.Generator().manual_seed(3)))
    with torch.no_grad():
        out = model(torch.randn(1, 12, 1, 2, 2))  # fp32 compute with bf16-stored weights
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_small_encoder_config_is_valid():
    """The parity configuration builds and has attention from level 1 on, as Genmo's."""
    model = Encoder(SMALL_ENCODER, device="meta")
    keys = model.state_dict().keys()
    assert "layers.4.layers.1.attn_block.attn.qkv.weight" in keys
    assert not any(k.startswith("layers.1.attn_block") for k in keys)
