"""Independent VAE implementations used as oracles, with shared random weights.

* the host's (ComfyUI 0.3.75) ``comfy.ldm.genmo.vae.model`` decoder and encoder, which take
  Genmo's key names directly (its encoder adds the Fourier features itself, in the input
  dtype, and its temporal attention is not causal: SPEC §3.7);
* diffusers' ``AutoencoderKLMochi``, loaded through a test-side Genmo → diffusers key
  conversion written from the tables of SPEC §2.5 (the core converts the other way, in
  ``mochi_core/checkpoints.py``; the two are written independently on purpose).

Widths are reduced (multiples of 32, because of the 32-group GroupNorm) to keep CPU tests fast.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mochi_core.vae import Decoder, DecoderConfig, Encoder, EncoderConfig
from tests.conftest import import_host

#: Small but complete configurations: every level, every block kind, Genmo's block counts.
SMALL_DECODER = DecoderConfig(channels=(32, 64, 96, 128))
SMALL_ENCODER = EncoderConfig(channels=(32, 64, 96, 128))
#: Shallow decoder for the tiling tests: one ResBlock per level, narrow at full resolution
#: (speed) but wide at the coarse levels, where GroupNorm groups need enough samples for
#: per-tile statistics to resemble the full-size model's (768 channels = 24 per group).
TINY_DECODER = DecoderConfig(channels=(32, 64, 128, 256), num_res_blocks=(1, 1, 1, 1, 1))


def _random_state_dict(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """fp32 random weights with sensible scales for every tensor of ``model`` (built on meta).

    Conv/Linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05²), norm weights ~ 1 + N(0, 0.1²),
    norm biases ~ N(0, 0.1²). The second conv of each ResBlock is halved so that the residual
    stream stays O(1) through ~20 blocks.
    """
    sd: dict[str, torch.Tensor] = {}
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    for name, ref in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        noise = torch.randn(ref.shape, generator=generator, dtype=torch.float32)
        if module in norms:
            sd[name] = 1.0 + 0.1 * noise if kind == "weight" else 0.1 * noise
        elif kind == "bias":
            sd[name] = 0.05 * noise
        else:
            scale = ref[0].numel() ** -0.5
            sd[name] = noise * scale * (0.5 if module.endswith("stack.5") else 1.0)
    return sd


def random_decoder_state_dict(
    config: DecoderConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random fp32 weights under Genmo's decoder key names for ``config``."""
    return _random_state_dict(Decoder(config, device="meta"), generator)


def random_encoder_state_dict(
    config: EncoderConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random fp32 weights under Genmo's encoder key names for ``config``."""
    return _random_state_dict(Encoder(config, device="meta"), generator)


def build_decoder(config: DecoderConfig, sd: dict[str, torch.Tensor]) -> Decoder:
    """Our decoder with ``sd`` assigned (built on meta: no wasted initialisation), in eval."""
    model = Decoder(config, device="meta")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def build_encoder(config: EncoderConfig, sd: dict[str, torch.Tensor]) -> Encoder:
    """Our encoder with ``sd`` assigned, in eval."""
    model = Encoder(config, device="meta")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------
# Host (ComfyUI) oracles
# ------------------------------------------------------------------------------------------


def host_vae_module():
    """The host's ``comfy.ldm.genmo.vae.model`` module (imported in CPU mode)."""
    import_host()
    import comfy.ldm.genmo.vae.model as host_vae  # noqa: PLC0415

    return host_vae


def _multipliers(channels: tuple[int, ...]) -> list[int]:
    assert all(c % channels[0] == 0 for c in channels), channels
    return [c // channels[0] for c in channels]


def host_decoder(config: DecoderConfig, sd: dict[str, torch.Tensor]) -> nn.Module:
    """The host's decoder at ``config``, loaded with ``sd`` (Genmo keys, strict)."""
    levels = len(config.channels) - 1
    model = host_vae_module().Decoder(
        out_channels=config.out_channels, latent_dim=config.latent_channels,
        base_channels=config.channels[0], channel_multipliers=_multipliers(config.channels),
        temporal_expansions=list(config.temporal_expansions),
        spatial_expansions=list(config.spatial_expansions),
        num_res_blocks=list(config.num_res_blocks), has_attention=[False] * (levels + 2),
        padding_mode="replicate", output_norm=False, nonlinearity="silu",
        output_nonlinearity="silu", causal=True,
    )
    model.load_state_dict(sd, strict=True)
    return model.eval()


def host_encoder(config: EncoderConfig, sd: dict[str, torch.Tensor]) -> nn.Module:
    """The host's encoder at ``config`` (takes 3-channel pixels, returns a distribution)."""
    levels = len(config.channels) - 1
    model = host_vae_module().Encoder(
        in_channels=config.in_channels, base_channels=config.channels[0],
        channel_multipliers=_multipliers(config.channels),
        num_res_blocks=list(config.num_res_blocks), latent_dim=config.latent_channels,
        temporal_reductions=list(config.temporal_reductions),
        spatial_reductions=list(config.spatial_reductions),
        prune_bottlenecks=[False] * (levels + 2), has_attentions=list(config.attention),
        affine=True, bias=True, input_is_conv_1x1=True, padding_mode="replicate",
    )
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------
# diffusers oracle and the test-side Genmo → diffusers key conversion (SPEC §2.5)
# ------------------------------------------------------------------------------------------

_RESNET_PARTS = {"0": "norm1.norm_layer", "2": "conv1.conv", "3": "norm2.norm_layer",
                 "5": "conv2.conv"}


def _resnet_key(block: str, j: int, rest: str) -> dict[str, str] | str:
    """Name inside a diffusers mid/down/up block for Genmo's ResBlock ``rest`` (after ``j.``)."""
    if m := re.fullmatch(r"stack\.(\d)\.(\w+)", rest):
        return f"{block}.resnets.{j}.{_RESNET_PARTS[m.group(1)]}.{m.group(2)}"
    if m := re.fullmatch(r"attn_block\.norm\.(\w+)", rest):
        return f"{block}.norms.{j}.norm_layer.{m.group(1)}"
    if m := re.fullmatch(r"attn_block\.attn\.out\.(\w+)", rest):
        return f"{block}.attentions.{j}.to_out.0.{m.group(1)}"
    if rest == "attn_block.attn.qkv.weight":
        return {p: f"{block}.attentions.{j}.to_{p}.weight" for p in "qkv"}
    raise KeyError(rest)


def _decoder_key(key: str, levels: int) -> dict[str, str] | str:
    if m := re.fullmatch(r"blocks\.0\.0\.(\w+)", key):
        return f"conv_in.{m.group(1)}"
    if m := re.fullmatch(r"blocks\.0\.(\d+)\.(.+)", key):
        return _resnet_key("block_in", int(m.group(1)) - 1, m.group(2))
    if m := re.fullmatch(r"blocks\.(\d+)\.proj\.(\w+)", key):
        return f"up_blocks.{int(m.group(1)) - 1}.proj.{m.group(2)}"
    if m := re.fullmatch(r"blocks\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        return _resnet_key(f"up_blocks.{int(m.group(1)) - 1}", int(m.group(2)), m.group(3))
    if m := re.fullmatch(rf"blocks\.{levels + 1}\.(\d+)\.(.+)", key):
        return _resnet_key("block_out", int(m.group(1)), m.group(2))
    if m := re.fullmatch(r"output_proj\.(\w+)", key):
        return f"proj_out.{m.group(1)}"
    raise KeyError(key)


def _encoder_key(key: str, first: int, levels: int) -> dict[str, str] | str:
    if m := re.fullmatch(r"layers\.0\.(\w+)", key):
        return f"proj_in.{m.group(1)}"
    if m := re.fullmatch(r"layers\.(\d+)\.layers\.(\d+)\.(.+)", key):
        block, j = f"down_blocks.{int(m.group(1)) - first - 1}", int(m.group(2))
        if j == 0:
            return f"{block}.conv_in.conv.{m.group(3)}"
        return _resnet_key(block, j - 1, m.group(3))
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
        i = int(m.group(1))
        if i <= first:
            return _resnet_key("block_in", i - 1, m.group(2))
        return _resnet_key("block_out", i - first - levels - 1, m.group(2))
    if m := re.fullmatch(r"output_norm\.(\w+)", key):
        return f"norm_out.norm_layer.{m.group(1)}"
    if key == "output_proj.weight":
        return "proj_out.weight"
    raise KeyError(key)


def _rename(sd: dict[str, torch.Tensor], rename, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = rename(key)
        if isinstance(new, dict):  # fused qkv → to_q / to_k / to_v
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[prefix + new[part]] = chunk
        else:
            out[prefix + new] = value
    return out


def genmo_to_diffusers_vae(
    decoder_sd: dict[str, torch.Tensor], encoder_sd: dict[str, torch.Tensor],
    decoder_config: DecoderConfig, encoder_config: EncoderConfig,
) -> dict[str, torch.Tensor]:
    """Genmo decoder + encoder state dicts → one ``AutoencoderKLMochi`` state dict."""
    dec_levels = len(decoder_config.channels) - 1
    enc_levels = len(encoder_config.channels) - 1
    first = encoder_config.num_res_blocks[0]
    out = _rename(decoder_sd, lambda k: _decoder_key(k, dec_levels), "decoder.")
    out |= _rename(encoder_sd, lambda k: _encoder_key(k, first, enc_levels), "encoder.")
    return out


def diffusers_vae(
    decoder_config: DecoderConfig, encoder_config: EncoderConfig,
    decoder_sd: dict[str, torch.Tensor], encoder_sd: dict[str, torch.Tensor],
) -> nn.Module:
    """diffusers' ``AutoencoderKLMochi`` with the same weights (fp32, eval, no tiling)."""
    from diffusers import AutoencoderKLMochi  # noqa: PLC0415

    assert decoder_config.num_res_blocks == encoder_config.num_res_blocks, "diffusers shares them"
    assert decoder_config.temporal_expansions == encoder_config.temporal_reductions
    model = AutoencoderKLMochi(
        in_channels=encoder_config.in_channels, out_channels=decoder_config.out_channels,
        encoder_block_out_channels=encoder_config.channels,
        decoder_block_out_channels=decoder_config.channels,
        latent_channels=decoder_config.latent_channels,
        layers_per_block=decoder_config.num_res_blocks,
        temporal_expansions=decoder_config.temporal_expansions,
        spatial_expansions=decoder_config.spatial_expansions,
        add_attention_block=encoder_config.attention,
    )
    sd = genmo_to_diffusers_vae(decoder_sd, encoder_sd, decoder_config, encoder_config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖₂ / ‖b‖₂`` in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
