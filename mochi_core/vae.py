"""Mochi's causal video VAE ("AsymmVAE", SPEC §3): decoder, encoder and latent statistics.

Shapes (full size): pixels ``B × 3 × F × H × W`` in [-1, 1] with ``F = 6k + 1`` and H, W
multiples of 8 ↔ latents ``B × 12 × (k + 1) × H/8 × W/8`` in *VAE space*. The DiT works in
*DiT space* ``(z − LATENT_MEAN) / LATENT_STD`` (§3.5).

Everything is causal in time: every temporal convolution pads ``k_t − 1`` frames at the front
only, GroupNorm normalises each frame on its own, and the encoder's temporal attention is
causal. That is what makes exact streaming possible (``vae_tiling``): a :class:`CausalCache`
passed through :meth:`Decoder.forward` carries each convolution's last input frames from one
chunk of latent frames to the next. The cache is an argument, never state stored on the model.

Module and parameter names equal Genmo's checkpoint keys, so ``decoder.safetensors`` and
``encoder.safetensors`` load with ``strict=True``. Layers are made through ``operations``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import ops

log = logging.getLogger(__name__)

#: Per-channel mean of Genmo's VAE latents (``vae_stats.py``; SPEC §3.5).
LATENT_MEAN: tuple[float, ...] = (
    -0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
    0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
    -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285,
)
#: Per-channel standard deviation of Genmo's VAE latents (SPEC §3.5).
LATENT_STD: tuple[float, ...] = (
    0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041,
)
LATENT_CHANNELS = 12
#: Pixel frames per latent frame after the first (temporal compression 1·2·3).
TEMPORAL_FACTOR = 6
#: Pixels per latent pixel along H and W (spatial compression 2·2·2).
SPATIAL_FACTOR = 8
GROUPS = 32
GROUP_NORM_EPS = 1e-5
#: Frames normalised per GroupNorm call, which bounds the temporaries (Genmo uses 8).
NORM_CHUNK_FRAMES = 8
ATTENTION_HEAD_DIM = 32
#: Rows (B·h·w temporal sequences) per attention call; larger grids are split.
ATTENTION_CHUNK_ROWS = 2**15
#: Base-2 exponents of the Fourier features (2⁶ and 2⁷ times 2π).
FOURIER_EXPONENTS = (6, 7)


def _stats(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """A ``1 × 12 × 1 × 1 × 1`` fp32 tensor on the device of ``like``."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)


def vae_to_dit_latents(z_vae: torch.Tensor) -> torch.Tensor:
    """VAE space → DiT space: ``(z − mean) / std`` per channel, computed in fp32.

    ``z_vae``: ``B × 12 × T × h × w``; returns the same shape and dtype.
    """
    z = (z_vae.float() - _stats(LATENT_MEAN, z_vae)) / _stats(LATENT_STD, z_vae)
    return z.to(z_vae.dtype)


def dit_to_vae_latents(z_dit: torch.Tensor) -> torch.Tensor:
    """DiT space → VAE space: ``z · std + mean`` per channel (do this before decoding).

    ``z_dit``: ``B × 12 × T × h × w``; returns the same shape and dtype.
    """
    z = z_dit.float() * _stats(LATENT_STD, z_dit) + _stats(LATENT_MEAN, z_dit)
    return z.to(z_dit.dtype)


def add_fourier_features(x: torch.Tensor) -> torch.Tensor:
    """Append sin/cos features at 2⁶·2π and 2⁷·2π to every channel (SPEC §3.4).

    ``x``: ``B × C × F × H × W`` in fp32 (Genmo requires fp32 "to avoid artifacts").
    Returns ``B × 5C × F × H × W``: ``[x, sin(h), cos(h)]`` where ``h`` repeats each channel
    once per frequency (channel-major: ``c0·f0, c0·f1, c1·f0, …``).
    """
    assert x.dtype == torch.float32, f"Fourier features must be computed in fp32, got {x.dtype}"
    assert x.ndim == 5, f"expected B × C × F × H × W, got shape {tuple(x.shape)}"
    exponents = torch.tensor(FOURIER_EXPONENTS, dtype=torch.float32, device=x.device)
    omega = (2.0**exponents) * (2 * torch.pi)
    h = rearrange(x, "b c t y x -> b c 1 t y x") * omega.view(1, 1, -1, 1, 1, 1)
    h = rearrange(h, "b c f t y x -> b (c f) t y x")
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1)


# ------------------------------------------------------------------------------------------
# Streaming state and functional building blocks
# ------------------------------------------------------------------------------------------


@dataclass
class CausalCache:
    """Carries the causal context of one streamed decode from one chunk to the next.

    ``history`` maps each causal convolution to the input frames it has not yet fully used
    (for a stride-1 kernel of depth ``k``: its last ``k − 1`` input frames, after padding).
    ``started`` becomes True after the first chunk, after which no convolution pads by
    replication and no depth-to-space drops frames: the clip's first frame is behind us.
    Create one per clip (and per spatial tile); never share it between clips.
    """

    history: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    started: bool = False


def frame_group_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D GroupNorm to every frame of ``x`` (``B × C × T × H × W``) on its own.

    Frames are processed ``NORM_CHUNK_FRAMES`` at a time into one output buffer, so the
    temporaries stay small. Returns ``B × C × T × H × W``.
    """
    out = torch.empty_like(x)
    for t0 in range(0, x.shape[2], NORM_CHUNK_FRAMES):
        frames = rearrange(x[:, :, t0 : t0 + NORM_CHUNK_FRAMES], "b c t h w -> (b t) c h w")
        normed = norm(frames)
        out[:, :, t0 : t0 + NORM_CHUNK_FRAMES] = rearrange(
            normed, "(b t) c h w -> b c t h w", b=x.shape[0]
        )
    return out


def channel_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1×1×1 convolution written as a Linear over channels: ``B × C × … → B × C' × …``."""
    return linear(x.movedim(1, -1)).movedim(-1, 1)


def _consumed_frames(length: int, kernel: int, stride: int) -> int:
    """How many leading frames of a padded sequence of ``length`` the next chunk never needs."""
    if length < kernel:
        return 0
    windows = (length - kernel) // stride + 1
    return windows * stride


def causal_conv3d(
    conv: nn.Conv3d, x: torch.Tensor, cache: CausalCache | None = None
) -> torch.Tensor:
    """Causal Conv3d with replicate padding: ``k_t − 1`` frames in front, ``(k − 1)/2`` in space.

    ``conv`` must be built with ``padding=0``. Without a cache (or on the first chunk) the
    front frames replicate frame 0; with a started cache they are the frames kept from the
    previous chunk, so chunked calls reproduce one call on the whole clip.
    ``x``: ``B × C × T × H × W`` → ``B × C' × T' × H' × W'``.
    """
    kt, kh, kw = conv.kernel_size
    stride_t = conv.stride[0]
    if cache is not None and conv in cache.history:
        x = torch.cat([cache.history[conv].to(x.dtype), x], dim=2)
    elif kt > 1:
        x = torch.cat([x[:, :, :1].expand(-1, -1, kt - 1, -1, -1), x], dim=2)
    if cache is not None and (kt > 1 or stride_t > 1):
        used = _consumed_frames(x.shape[2], kt, stride_t)
        cache.history[conv] = x[:, :, used:].clone()
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph, 0, 0), mode="replicate")
    return conv(x)


def depth_to_space_time(
    x: torch.Tensor, temporal: int, spatial: int, *, drop_first: bool
) -> torch.Tensor:
    """``B × (C·st·s·s) × T × H × W → B × C × (T·st) × (H·s) × (W·s)``.

    With ``drop_first`` (the chunk holding the clip's first frame) the first ``st − 1``
    frames are dropped right here, as Genmo does, so latent frame 0 expands to one frame.
    """
    x = rearrange(
        x, "b (c st sh sw) t h w -> b c (t st) (h sh) (w sw)", st=temporal, sh=spatial, sw=spatial
    )
    if drop_first and temporal > 1:
        x = x[:, :, temporal - 1 :]
    return x


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------


def _group_norm(channels: int, operations: SimpleNamespace, device, dtype) -> nn.Module:
    if channels % GROUPS:
        raise ValueError(f"VAE widths must be multiples of {GROUPS} (GroupNorm), got {channels}")
    return operations.GroupNorm(
        GROUPS, channels, eps=GROUP_NORM_EPS, affine=True, device=device, dtype=dtype
    )


class TemporalAttention(nn.Module):
    """Causal self-attention along time at every spatial position (encoder only, §3.2).

    q and k are L2-normalised, the scale is ``32^−0.5``, heads = C/32. With one frame the
    result is ``out(v)``. ``forward``: ``B × C × T × H × W → B × C × T × H × W``.
    """

    def __init__(self, channels: int, *, operations=ops.cast, device=None, dtype=None) -> None:
        super().__init__()
        self.heads = channels // ATTENTION_HEAD_DIM
        self.qkv = operations.Linear(channels, 3 * channels, bias=False, device=device, dtype=dtype)
        self.out = operations.Linear(channels, channels, bias=True, device=device, dtype=dtype)

    def _attend(self, seq: torch.Tensor) -> torch.Tensor:
        """``N × T × C`` sequences → ``N × T × C`` (before the output projection)."""
        q, k, v = rearrange(
            self.qkv(seq), "n t (three h d) -> three n h t d", three=3, h=self.heads
        )
        q, k = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=ATTENTION_HEAD_DIM**-0.5
        )
        return rearrange(o, "n h t d -> n t (h d)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if t == 1:
            v = self.qkv(x.movedim(1, -1))[..., 2 * c :]
            return self.out(v).movedim(-1, 1)
        seq = rearrange(x, "b c t h w -> (b h w) t c")
        out = torch.cat(
            [self._attend(rows) for rows in seq.split(ATTENTION_CHUNK_ROWS, dim=0)], dim=0
        )
        return rearrange(self.out(out), "(b h w) t c -> b c t h w", b=b, h=h, w=w)


class AttentionBlock(nn.Module):
    """``x + attn(GroupNorm(x))`` on ``B × C × T × H × W``."""

    def __init__(self, channels: int, *, operations=ops.cast, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = _group_norm(channels, operations, device, dtype)
        self.attn = TemporalAttention(channels, operations=operations, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(frame_group_norm(self.norm, x))


class ResBlock(nn.Module):
    """``x + conv(silu(gn(conv(silu(gn(x))))))`` with causal 3×3×3 convs, then optional attention.

    ``stack`` keeps Genmo's indices: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 conv.
    ``forward``: ``B × C × T × H × W → B × C × T × H × W``.
    """

    def __init__(
        self, channels: int, *, attention: bool = False, operations=ops.cast, device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        conv = dict(kernel_size=3, stride=1, padding=0, bias=True, device=device, dtype=dtype)
        self.stack = nn.ModuleList([
            _group_norm(channels, operations, device, dtype), nn.SiLU(),
            operations.Conv3d(channels, channels, **conv),
            _group_norm(channels, operations, device, dtype), nn.SiLU(),
            operations.Conv3d(channels, channels, **conv),
        ])
        self.attn_block = (
            AttentionBlock(channels, operations=operations, device=device, dtype=dtype)
            if attention else None
        )

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = F.silu(frame_group_norm(self.stack[0], x), inplace=True)
        h = causal_conv3d(self.stack[2], h, cache)
        h = F.silu(frame_group_norm(self.stack[3], h), inplace=True)
        x = x + causal_conv3d(self.stack[5], h, cache)
        if self.attn_block is not None:
            x = self.attn_block(x)
        return x


class UpsampleBlock(nn.Module):
    """ResBlocks, a channel Linear, then depth-to-space-time (``blocks.{1..3}`` of the decoder).

    ``B × C_in × T × H × W → B × C_out × (T·st − (st−1 if first chunk)) × 2H × 2W``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_res_blocks: int, temporal: int,
        spatial: int, *, operations=ops.cast, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.temporal, self.spatial = temporal, spatial
        self.blocks = nn.ModuleList([
            ResBlock(in_channels, operations=operations, device=device, dtype=dtype)
            for _ in range(num_res_blocks)
        ])
        width = out_channels * temporal * spatial**2
        self.proj = operations.Linear(in_channels, width, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cache: CausalCache | None, *, at_start: bool
    ) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cache)
        x = channel_linear(self.proj, x)
        return depth_to_space_time(x, self.temporal, self.spatial, drop_first=at_start)


class DownsampleBlock(nn.Module):
    """A strided causal conv (kernel = stride = ``(tr, sr, sr)``), then ResBlocks (+attention)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_res_blocks: int, temporal: int,
        spatial: int, attention: bool, *, operations=ops.cast, device=None, dtype=None,
    ) -> None:
        super().__init__()
        kernel = (temporal, spatial, spatial)
        layers: list[nn.Module] = [operations.Conv3d(
            in_channels, out_channels, kernel_size=kernel, stride=kernel, padding=0, bias=True,
            device=device, dtype=dtype,
        )]
        layers += [
            ResBlock(out_channels, attention=attention, operations=operations, device=device,
                     dtype=dtype)
            for _ in range(num_res_blocks)
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = causal_conv3d(self.layers[0], x)
        for block in self.layers[1:]:
            x = block(x)
        return x


# ------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct integer indices ``i`` for which ``pattern.format(i=...)`` keys exist."""
    regex = re.compile(pattern.replace(".", r"\.").replace("{i}", r"(\d+)"))
    return len({int(m.group(1)) for k in sd if (m := regex.match(k))})


def _require(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"{what} state dict has no {key!r} (first keys: {sorted(sd)[:5]})")
    return sd[key]


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder hyper-parameters (Genmo's ``DecoderModelFactory``, SPEC §3.3).

    ``channels`` are the widths from the finest level (next to pixels) to the coarsest
    (next to the latent); ``num_res_blocks`` follows Genmo: ``[last, up3, up2, up1, first]``.
    """

    latent_channels: int = LATENT_CHANNELS
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 512, 768)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)

    def __post_init__(self) -> None:
        levels = len(self.channels) - 1
        if len(self.num_res_blocks) != levels + 2:
            raise ValueError(f"num_res_blocks needs {levels + 2} entries: {self.num_res_blocks}")
        if not len(self.temporal_expansions) == len(self.spatial_expansions) == levels:
            raise ValueError("temporal/spatial expansions need one entry per upsampling level")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> DecoderConfig:
        """Infer widths, block counts and temporal expansions from Genmo decoder keys."""
        sd = _strip(sd, prefix)
        conv_in = _require(sd, "blocks.0.0.weight", "decoder")
        levels = _count(sd, "blocks.{i}.proj.weight")
        last = levels + 1
        width = [_require(sd, f"blocks.{last}.0.stack.0.weight", "decoder").shape[0]]
        temporal: list[int] = []
        for b in range(levels, 0, -1):  # from the finest up-block to the coarsest
            proj = sd[f"blocks.{b}.proj.weight"]
            if proj.shape[0] % (width[-1] * 4):
                raise ValueError(f"blocks.{b}.proj.weight {tuple(proj.shape)} does not expand "
                                 f"to {width[-1]} channels by 2×2 space and whole frames")
            temporal.append(proj.shape[0] // (width[-1] * 4))
            width.append(proj.shape[1])
        blocks = [_count(sd, f"blocks.{last}.{{i}}.stack.0.weight")]
        for b in range(levels, 0, -1):
            blocks.append(_count(sd, f"blocks.{b}.blocks.{{i}}.stack.0.weight"))
        blocks.append(_count(sd, "blocks.0.{i}.stack.0.weight"))
        out = _require(sd, "output_proj.weight", "decoder").shape[0]
        return cls(
            latent_channels=conv_in.shape[1], out_channels=out, channels=tuple(width),
            num_res_blocks=tuple(blocks), temporal_expansions=tuple(temporal),
            spatial_expansions=(2,) * levels,
        )


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder hyper-parameters (Genmo's ``EncoderModelFactory``, SPEC §3.4).

    ``channels`` go from the input level to the latent level; ``num_res_blocks`` and
    ``attention`` have one entry for the input level, one per downsampling level and one for
    the final blocks.
    """

    in_channels: int = 15
    latent_channels: int = LATENT_CHANNELS
    channels: tuple[int, ...] = (64, 128, 256, 384)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_reductions: tuple[int, ...] = (1, 2, 3)
    spatial_reductions: tuple[int, ...] = (2, 2, 2)
    attention: tuple[bool, ...] = (False, True, True, True, True)

    def __post_init__(self) -> None:
        levels = len(self.channels) - 1
        if not len(self.num_res_blocks) == len(self.attention) == levels + 2:
            raise ValueError("num_res_blocks and attention need one entry per level plus two")
        if not len(self.temporal_reductions) == len(self.spatial_reductions) == levels:
            raise ValueError("temporal/spatial reductions need one entry per downsampling level")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> EncoderConfig:
        """Infer widths, reductions, block counts and attention from Genmo encoder keys."""
        sd = _strip(sd, prefix)
        proj_in = _require(sd, "layers.0.weight", "encoder")
        first_blocks = 0
        while f"layers.{first_blocks + 1}.stack.0.weight" in sd:
            first_blocks += 1
        channels, temporal, spatial, blocks, attn = [proj_in.shape[0]], [], [], [first_blocks], []
        attn.append("layers.1.attn_block.norm.weight" in sd)
        i = first_blocks + 1
        while f"layers.{i}.layers.0.weight" in sd:
            w = sd[f"layers.{i}.layers.0.weight"]
            channels.append(w.shape[0])
            temporal.append(w.shape[2])
            spatial.append(w.shape[3])
            blocks.append(_count(sd, f"layers.{i}.layers.{{i}}.stack.0.weight"))
            attn.append(f"layers.{i}.layers.1.attn_block.norm.weight" in sd)
            i += 1
        blocks.append(_count(sd, "layers.{i}.stack.0.weight") - first_blocks)
        attn.append(f"layers.{i}.attn_block.norm.weight" in sd)
        latent = _require(sd, "output_proj.weight", "encoder").shape[0] // 2
        return cls(
            in_channels=proj_in.shape[1], latent_channels=latent, channels=tuple(channels),
            num_res_blocks=tuple(blocks), temporal_reductions=tuple(temporal),
            spatial_reductions=tuple(spatial), attention=tuple(attn),
        )


# ------------------------------------------------------------------------------------------
# Decoder and encoder
# ------------------------------------------------------------------------------------------


def decoded_frames(latent_frames: int) -> int:
    """Pixel frames produced from ``latent_frames`` latent frames: ``6T − 5``."""
    return TEMPORAL_FACTOR * latent_frames - (TEMPORAL_FACTOR - 1)


def latent_frames(pixel_frames: int) -> int:
    """Latent frames for ``6k + 1`` pixel frames: ``k + 1`` (raises on other counts)."""
    if pixel_frames < 1 or (pixel_frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"the VAE needs 6k+1 frames (1, 7, 13, …), got {pixel_frames}")
    return (pixel_frames - 1) // TEMPORAL_FACTOR + 1


class Decoder(nn.Module):
    """Genmo's causal video decoder: latents in VAE space → pixels in [-1, 1] (no clamp).

    Modules: ``blocks.0`` = [1×1×1 conv_in, ResBlocks], ``blocks.1..L`` = upsampling blocks,
    ``blocks.L+1`` = ResBlocks, ``output_proj`` = channel Linear to RGB.
    """

    def __init__(
        self, config: DecoderConfig | None = None, *, operations: SimpleNamespace = ops.cast,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config or DecoderConfig()
        kw = dict(operations=operations, device=device, dtype=dtype)
        ch, nrb, levels = cfg.channels, cfg.num_res_blocks, len(cfg.channels) - 1
        first: list[nn.Module] = [operations.Conv3d(
            cfg.latent_channels, ch[-1], kernel_size=1, padding=0, device=device, dtype=dtype
        )]
        first += [ResBlock(ch[-1], **kw) for _ in range(nrb[-1])]
        blocks: list[nn.Module] = [nn.ModuleList(first)]
        for b in range(1, levels + 1):
            blocks.append(UpsampleBlock(
                ch[-b], ch[-b - 1], nrb[-b - 1], cfg.temporal_expansions[-b],
                cfg.spatial_expansions[-b], **kw,
            ))
        blocks.append(nn.ModuleList([ResBlock(ch[0], **kw) for _ in range(nrb[0])]))
        self.blocks = nn.ModuleList(blocks)
        self.output_proj = operations.Linear(ch[0], cfg.out_channels, device=device, dtype=dtype)

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels or 0 in z.shape:
            raise ValueError(
                f"decoder expects latents B × {self.config.latent_channels} × T × h × w "
                f"(VAE space), got shape {tuple(z.shape)}"
            )

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """Decode ``z`` (``B × 12 × T × h × w``, VAE space) to ``B × 3 × (6T − 5) × 8h × 8w``.

        Computes in ``z.dtype``. With a :class:`CausalCache`, ``z`` may be the next chunk of
        latent frames of a longer clip: the first chunk gives ``6T_c − 5`` frames, every
        later one ``6T_c``, and the concatenation equals decoding the whole clip at once.
        """
        self._check(z)
        at_start = cache is None or not cache.started
        x = causal_conv3d(self.blocks[0][0], z, cache)
        for block in self.blocks[0][1:]:
            x = block(x, cache)
        for up in self.blocks[1:-1]:
            x = up(x, cache, at_start=at_start)
        for block in self.blocks[-1]:
            x = block(x, cache)
        if cache is not None:
            cache.started = True
        return channel_linear(self.output_proj, F.silu(x))


class Encoder(nn.Module):
    """Genmo's causal video encoder (15-channel Fourier input → mean and log-variance).

    Modules: ``layers.0`` channel Linear, ``layers.1..n`` ResBlocks, then one
    :class:`DownsampleBlock` per level, then ResBlocks with attention; ``output_norm``,
    ``output_proj`` (no bias). Use :meth:`encode` on pixels; :meth:`forward` takes features.
    """

    def __init__(
        self, config: EncoderConfig | None = None, *, operations: SimpleNamespace = ops.cast,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config or EncoderConfig()
        kw = dict(operations=operations, device=device, dtype=dtype)
        ch, nrb, attn = cfg.channels, cfg.num_res_blocks, cfg.attention
        layers: list[nn.Module] = [
            operations.Linear(cfg.in_channels, ch[0], device=device, dtype=dtype)
        ]
        layers += [ResBlock(ch[0], attention=attn[0], **kw) for _ in range(nrb[0])]
        for i in range(len(ch) - 1):
            layers.append(DownsampleBlock(
                ch[i], ch[i + 1], nrb[i + 1], cfg.temporal_reductions[i],
                cfg.spatial_reductions[i], attn[i + 1], **kw,
            ))
        layers += [ResBlock(ch[-1], attention=attn[-1], **kw) for _ in range(nrb[-1])]
        self.layers = nn.ModuleList(layers)
        self.output_norm = _group_norm(ch[-1], operations, device, dtype)
        self.output_proj = operations.Linear(
            ch[-1], 2 * cfg.latent_channels, bias=False, device=device, dtype=dtype
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B × 15 × F × H × W`` Fourier features → (mean, logvar), each ``B × 12 × T × h × w``.

        Computes in ``features.dtype``; ``T = (F − 1)/6 + 1``, ``h, w = H/8, W/8``.
        """
        x = channel_linear(self.layers[0], features)
        for layer in self.layers[1:]:
            x = layer(x)
        x = F.silu(frame_group_norm(self.output_norm, x), inplace=True)
        mean, logvar = channel_linear(self.output_proj, x).chunk(2, dim=1)
        return mean, logvar

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``pixels`` is ``B × 3 × (6k+1) × 8m × 8n``."""
        if pixels.ndim != 5 or pixels.shape[1] * 5 != self.config.in_channels:
            raise ValueError(f"encoder expects pixels B × 3 × F × H × W, got {tuple(pixels.shape)}")
        latent_frames(pixels.shape[2])
        h, w = pixels.shape[-2:]
        if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR or not h or not w:
            raise ValueError(f"height and width must be multiples of 8, got {h}×{w}")

    def encode_distribution(
        self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels ``B × 3 × F × H × W`` in [-1, 1] → (mean, logvar) in VAE space.

        The Fourier features are computed in fp32, then the network runs in ``dtype``.
        """
        self.check_pixels(pixels)
        return self(add_fourier_features(pixels.float()).to(dtype))

    def encode(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pixels ``B × 3 × F × H × W`` in [-1, 1] → latent mean ``B × 12 × T × H/8 × W/8``."""
        return self.encode_distribution(pixels, dtype)[0]
