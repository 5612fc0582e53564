"""AsymmDiT: the Mochi 1 video transformer (SPEC §1).

Module and parameter names are Genmo's checkpoint keys, so a Genmo state dict loads with
``strict=True``. The forward pass takes ``sigma`` (1 = pure noise), embeds ``(1 − σ)·1000`` itself
and returns the flow velocity ``v ≈ x₀ − ε`` in fp32.

Precision:

* Linear/Conv weights are stored in the ``dtype`` given at construction (or whatever a loader
  assigns) and cast per layer by ``operations``. The *compute dtype* of the token streams is
  ``compute_dtype`` when given; otherwise the dtype of the stored block Linear weights when that
  is fp32, bf16 or fp16, and bf16 for anything else (fp8 or quantized storage).
* The QK-norm weights and ``pos_frequencies`` are always stored in fp32. The timestep sinusoid,
  the RoPE angles and rotation, and every RMS/Layer norm with its modulation run in fp32.

Text padding: ``y_mask`` must be a right-padded prefix (T5 padding). Padded tokens never take
part: the text stream is cropped to the longest prompt of the batch, and inside it the padded
rows of shorter prompts are zeroed and masked out as attention keys. An all-False mask gives
zero text tokens (Genmo's empty negative prompt).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import ops
from .attention import AttentionFn, attend, get_attention

log = logging.getLogger(__name__)

MOD_NORM_EPS = 1e-6  # modulated and tanh-gated residual RMS norms, final LayerNorm
QK_NORM_EPS = 1e-5
ROPE_TARGET_AREA = 36864.0  # 192² patches: every resolution spans the same RoPE area
_FLOAT_COMPUTE = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the AsymmDiT (defaults: the full Mochi 1 preview, SPEC §1.1)."""

    depth: int = 48
    hidden_size_x: int = 3072
    hidden_size_y: int = 1536
    num_heads: int = 24
    mlp_hidden_x: int = 8192  # SwiGLU inner width; w1 has 2× this many outputs
    mlp_hidden_y: int = 4096
    patch_size: int = 2
    in_channels: int = 12
    t5_feat_dim: int = 4096
    pool_heads: int = 8
    timestep_dim: int = 256
    timestep_scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.hidden_size_x % self.num_heads or self.head_dim % 2:
            raise ValueError(
                f"hidden_size_x={self.hidden_size_x} must split into {self.num_heads} heads "
                "of even size"
            )
        if self.t5_feat_dim % self.pool_heads:
            raise ValueError(f"t5_feat_dim={self.t5_feat_dim} not divisible by pool_heads")

    @property
    def head_dim(self) -> int:
        """Per-head width of the joint attention (visual width / heads)."""
        return self.hidden_size_x // self.num_heads

    @classmethod
    def mochi_preview(cls) -> DiTConfig:
        """The released Mochi 1 preview: 48 blocks, widths 3072/1536, 24 heads."""
        return cls()

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> DiTConfig:
        """Infer the config from the names and shapes of a Genmo-keyed state dict.

        Raises:
            ValueError: when required keys are missing (e.g. a prefixed or diffusers-format
                dict) or the shapes are inconsistent.
        """
        required = (
            "pos_frequencies", "x_embedder.proj.weight", "t_embedder.mlp.0.weight",
            "t5_yproj.weight", "blocks.0.mlp_x.w1.weight", "final_layer.linear.weight",
        )  # fmt: skip
        missing = [key for key in required if key not in sd]
        if missing:
            raise ValueError(
                f"not a Genmo-keyed Mochi DiT state dict: missing {missing} "
                f"(first keys: {list(sd)[:5]})"
            )
        depth = 1 + max(int(m[1]) for key in sd if (m := re.match(r"blocks\.(\d+)\.", key)))
        _, heads, half = sd["pos_frequencies"].shape
        hidden_x, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
        hidden_y, t5_dim = sd["t5_yproj.weight"].shape
        mlp_y = sd.get("blocks.0.mlp_y.w1.weight")
        config = cls(
            depth=depth, hidden_size_x=hidden_x, hidden_size_y=hidden_y, num_heads=heads,
            mlp_hidden_x=sd["blocks.0.mlp_x.w1.weight"].shape[0] // 2,
            mlp_hidden_y=mlp_y.shape[0] // 2 if mlp_y is not None else 0,
            patch_size=patch, in_channels=in_channels, t5_feat_dim=t5_dim,
            timestep_dim=sd["t_embedder.mlp.0.weight"].shape[1],
        )  # fmt: skip
        if config.head_dim != 2 * half:
            raise ValueError(f"pos_frequencies {tuple(sd['pos_frequencies'].shape)} does not "
                             f"match {heads} heads of width {config.head_dim}")  # fmt: skip
        return config


# --------------------------------------------------------------------------------------------
# Functional pieces (fp32 math)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of timesteps ``t`` (B,) → (B, dim), fp32."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half)
    )
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def token_chunks(n: int, size: int) -> list[slice]:
    """``range(n)`` cut into the fewest slices of at most ``size`` tokens, of near-equal length."""
    count = -(-n // size)
    step = -(-n // count) if count else 1
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x²) + eps)`` over the last dim, accumulated in fp32: (..., D) → (..., 1)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


# Performance: the fp32 norms below convert a bf16/fp16 input to fp32 once and compute the
# statistic and every product on that copy, in place (mixing a bf16 tensor into fp32 ops would
# convert it again inside each op); the result is rounded to the input dtype once. With fp32
# input ``x.float()`` is ``x`` itself and no copy is made. The tokens are normalised in one
# call, not in chunks (BENCHMARKS.md, section 1).


def modulated_rmsnorm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(x)·(1 + scale)`` in fp32, no weight; x (B, S, D), scale (B, D) → x.dtype."""
    x32 = x.float()
    normed = x32 * inv_rms(x32, MOD_NORM_EPS)  # a new fp32 tensor
    return normed.mul_(1.0 + scale.float().unsqueeze(1)).to(x.dtype)


def _gated(branch: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``RMSNorm(branch)·tanh(gate)`` in fp32 (no weight), rounded once to ``dtype``."""
    b32 = branch.float()
    normed = b32 * inv_rms(b32, MOD_NORM_EPS)
    return normed.mul_(torch.tanh(gate.float()).unsqueeze(1)).to(dtype)


def gated_residual(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + RMSNorm(branch)·tanh(gate)``, norm in fp32 without weight.

    x, branch (B, S, D); gate (B, D); returns a new tensor in x.dtype.
    """
    return x + _gated(branch, gate, x.dtype)


def add_gated_(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """:func:`gated_residual` in place: ``x += RMSNorm(branch)·tanh(gate)``; returns x."""
    return x.add_(_gated(branch, gate, x.dtype))


def rope_positions(
    T: int,
    pH: int,
    pW: int,
    *,
    canvas_hw: tuple[int, int] | None = None,
    offset_thw: tuple[int, int, int] = (0, 0, 0),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RoPE positions (t, h, w) of the ``T × pH × pW`` visual tokens, (N, 3) fp32, row-major.

    ``t`` is the latent frame index; ``h`` and ``w`` are bin centres of the canvas, centred and
    scaled by ``sqrt(36864 / (cH·cW))`` so every resolution spans the same area. By default the
    canvas is the token grid itself (``cH, cW = pH, pW``); a tile of a larger canvas passes
    ``canvas_hw`` (in patches) and its ``offset_thw`` on it to get the positions it has there.
    """
    c_h, c_w = canvas_hw if canvas_hw is not None else (pH, pW)
    t0, h0, w0 = offset_thw
    if h0 < 0 or w0 < 0 or h0 + pH > c_h or w0 + pW > c_w:
        raise ValueError(f"tile {pH}×{pW} at ({h0}, {w0}) is outside the canvas {c_h}×{c_w}")
    scale = math.sqrt(ROPE_TARGET_AREA / (c_h * c_w))
    f64 = torch.float64  # exact centres, rounded once to fp32 (built on the CPU: MPS has no f64)
    t = torch.arange(t0, t0 + T, dtype=f64)
    h = (torch.arange(h0, h0 + pH, dtype=f64) + 0.5 - c_h / 2) * scale
    w = (torch.arange(w0, w0 + pW, dtype=f64) + 0.5 - c_w / 2) * scale
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)  # (T, pH, pW, 3)
    return rearrange(grid, "t h w c -> (t h w) c").to(device=device, dtype=torch.float32)


def rope_rotation(pos_frequencies: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotations ``(cos θ, sin θ)``, θ = Σ_axis pos·freq; (N, heads, head_dim/2, 2) fp32.

    pos_frequencies (3, heads, head_dim/2) and positions (N, 3) are used in fp32. Real cos/sin
    rather than complex64 ``exp(i·θ)`` (the same values, the same bytes): inductor generates no
    code for complex tensors, so a complex rotation would split every compiled block.
    """
    angles = torch.einsum("na,ahf->nhf", positions.float(), pos_frequencies.float())
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(t: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of fp32 ``t`` (B, N, heads, D) by ``rotation``
    (N, heads, D/2, 2) of :func:`rope_rotation`: ``(a·cos − b·sin, a·sin + b·cos)``."""
    pairs = t.unflatten(-1, (-1, 2))  # (B, N, heads, D/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = rotation[..., 0], rotation[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class RopeCache:
    """The last rotation :func:`rope_rotation` built, reused while its inputs are unchanged.

    The rotation is constant per (frequencies, positions, device) but large (547 MB in fp32 at
    44,520 tokens × 24 heads × 64 pairs), so rebuilding it at every step costs time and
    allocator churn. Only the last entry is kept (a new shape or tile replaces it, nothing
    accumulates). A hit needs equal frequency *values* (a LoRA patch, an in-place edit or a
    moved weight of the same values are all caught by comparing the 4,608 numbers, not by
    ``data_ptr``) and equal positions. Meta tensors and a rotation that autograd tracks are
    never cached.
    """

    def __init__(self) -> None:
        self._key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rotation: torch.Tensor | None = None

    def clear(self) -> None:
        """Drop the cached rotation (frees its memory)."""
        self._key = self._rotation = None

    def get(self, pos_frequencies: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:func:`rope_rotation` of the arguments (on their device), cached."""
        if pos_frequencies.is_meta or positions.is_meta or (
            torch.is_grad_enabled() and pos_frequencies.requires_grad
        ):  # nothing to compare, or a result tied to this call's autograd graph
            return rope_rotation(pos_frequencies, positions)
        if self._key is not None and self._matches(pos_frequencies, positions):
            return self._rotation
        self.clear()  # the old rotation is freed before the new one is built
        rotation = rope_rotation(pos_frequencies, positions)
        self._key = (pos_frequencies.detach().clone(), positions.detach().clone())
        self._rotation = rotation
        return rotation

    def _matches(self, pos_frequencies: torch.Tensor, positions: torch.Tensor) -> bool:
        freqs, pos = self._key
        return all(
            a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            for a, b in ((freqs, pos_frequencies), (pos, positions))
        )


# --------------------------------------------------------------------------------------------
# Modules (names follow Genmo's checkpoint keys)


class _KeepsFp32(nn.Module):
    """A module whose parameters named in ``_fp32_params`` (relative names, its own or its
    children's) load as fp32 whatever the checkpoint dtype, also with
    ``load_state_dict(..., assign=True)``."""

    _fp32_params: tuple[str, ...] = ()

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        for name in self._fp32_params:
            value = state_dict.get(prefix + name)
            if value is not None and value.dtype != torch.float32:
                state_dict[prefix + name] = value.float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchEmbed(nn.Module):
    """2-D patch embedding applied frame by frame: (B, C, T, H, W) → (B, T·H/p·W/p, D)."""

    def __init__(self, config: DiTConfig, operations, device, dtype) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = operations.Conv2d(
            config.in_channels, config.hidden_size_x, kernel_size=p, stride=p, bias=True,
            device=device, dtype=dtype,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) → tokens (B, N, D) ordered (T, H/p, W/p)."""
        B = x.shape[0]
        frames = self.proj(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(frames, "(b t) d h w -> b (t h w) d", b=B)


class TimestepEmbedder(nn.Module):
    """``mlp(sinusoid(t))``: Linear(256→D), SiLU, Linear(D→D)."""

    def __init__(self, config: DiTConfig, operations, device, dtype) -> None:
        super().__init__()
        d, f = config.hidden_size_x, config.timestep_dim
        self.frequency_dim = f
        self.mlp = nn.Sequential(
            operations.Linear(f, d, bias=True, device=device, dtype=dtype),
            nn.SiLU(),
            operations.Linear(d, d, bias=True, device=device, dtype=dtype),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t (B,) already scaled (0..1000) → (B, D) in ``dtype``."""
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(dtype))


class AttentionPool(nn.Module):
    """Caption pooling: the masked mean token queries [mean, tokens…] (8 heads) → (B, D_x)."""

    def __init__(self, config: DiTConfig, operations, device, dtype) -> None:
        super().__init__()
        e, kw = config.t5_feat_dim, {"device": device, "dtype": dtype}
        self.num_heads = config.pool_heads
        self.to_kv = operations.Linear(e, 2 * e, bias=True, **kw)
        self.to_q = operations.Linear(e, e, bias=True, **kw)
        self.to_out = operations.Linear(e, config.hidden_size_x, bias=True, **kw)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feats (B, L, E) with padded rows already zero, mask (B, L) bool → (B, D_x)."""
        weights = mask.unsqueeze(-1).to(feats.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (feats * weights).sum(dim=1, keepdim=True)  # (B, 1, E)
        tokens = torch.cat([mean, feats], dim=1)  # (B, 1+L, E)
        k, v = rearrange(self.to_kv(tokens), "b s (two h d) -> two b h s d", two=2,
                         h=self.num_heads)  # fmt: skip
        q = rearrange(self.to_q(mean), "b s (h d) -> b h s d", h=self.num_heads)
        keep = F.pad(mask, (1, 0), value=True)[:, None, None, :]  # mean token always visible
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, h, 1, d)
        return self.to_out(rearrange(pooled, "b h s d -> b (s h d)"))


def qk_norm(t: torch.Tensor, weight: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Per-head RMSNorm (eps 1e-5) with an fp32 ``weight`` (D,), then RoPE when ``rotation`` is
    given, on t (B, S, heads, D); returns a new fp32 tensor of that shape."""
    t32 = t.float()
    normed = (t32 * inv_rms(t32, QK_NORM_EPS)).mul_(weight)  # new, contiguous
    return normed if rotation is None else apply_rope(normed, rotation)


def qk_norm_(
    t: torch.Tensor, weight: torch.Tensor, rotation: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """:func:`qk_norm` written into ``out`` (same shape, its own dtype, e.g. a slice of the
    joint q buffer); returns ``out``."""
    return out.copy_(qk_norm(t, weight, rotation))


class FeedForward(nn.Module):
    """SwiGLU ``w2(SiLU(a)·b)`` with ``a, b = w1(x).chunk(2)`` (SiLU on the first half)."""

    def __init__(self, dim: int, hidden: int, operations, device, dtype) -> None:
        super().__init__()
        self.w1 = operations.Linear(dim, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.w2 = operations.Linear(hidden, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, dim) → (B, S, dim)."""
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a).mul_(b))


class AsymmetricAttention(_KeepsFp32):
    """Joint attention over [visual tokens, text tokens] with separate projections per stream.

    The QK-norm weights (``q_norm_x.weight``, ...) are fp32 tensors held by
    :class:`~mochi_core.ops.Weight` modules and applied by :func:`qk_norm_`.
    """

    _fp32_params = ("q_norm_x.weight", "k_norm_x.weight", "q_norm_y.weight", "k_norm_y.weight")

    def __init__(self, config: DiTConfig, update_y: bool, operations, device, dtype) -> None:
        super().__init__()
        dx, dy, kw = config.hidden_size_x, config.hidden_size_y, {"device": device, "dtype": dtype}
        self.num_heads = config.num_heads
        self.qkv_x = operations.Linear(dx, 3 * dx, bias=False, **kw)
        self.qkv_y = operations.Linear(dy, 3 * dx, bias=False, **kw)
        norm = ops.weight_factory(operations)
        shape, fp32 = (config.head_dim,), torch.float32
        self.q_norm_x = norm(shape, device=device, dtype=fp32, fill=1.0)
        self.k_norm_x = norm(shape, device=device, dtype=fp32, fill=1.0)
        self.q_norm_y = norm(shape, device=device, dtype=fp32, fill=1.0)
        self.k_norm_y = norm(shape, device=device, dtype=fp32, fill=1.0)
        self.proj_x = operations.Linear(dx, dx, bias=True, **kw)
        self.proj_y = operations.Linear(dx, dy, bias=True, **kw) if update_y else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rotation: torch.Tensor,
        valid: torch.Tensor | None,
        attention: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-normed x (B, N, Dx), y (B, L, Dy) → attention outputs (B, N, Dx), (B, L, Dy).

        ``valid`` is the (B, N+L) key mask or None; the y output of a block that does not
        update y is the raw (B, L, Dx) attention output and is discarded by the caller.
        """
        B, N, _ = x.shape
        qkv_x = self.qkv_x(x).unflatten(-1, (3, self.num_heads, -1))  # (B, N, 3, heads, D)
        qkv_y = self.qkv_y(y).unflatten(-1, (3, self.num_heads, -1))  # (B, L, 3, heads, D)
        if torch.compiler.is_compiling():
            q, k, v = self._joint_qkv_cat(qkv_x, qkv_y, rotation, x.dtype)
        else:
            q, k, v = self._joint_qkv_buffers(qkv_x, qkv_y, rotation, x.dtype)
        del qkv_x, qkv_y
        out = attend(attention, *(t.transpose(1, 2) for t in (q, k, v)), valid)
        out = rearrange(out, "b h s d -> b s (h d)")
        return self.proj_x(out[:, :N]), self.proj_y(out[:, N:])


    def _joint_qkv_buffers(
        self, qkv_x: torch.Tensor, qkv_y: torch.Tensor, rotation: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """q, k, v (B, N+L, heads, D) of the joint sequence [visual, text] from qkv_x
        (B, N, 3, heads, D) and qkv_y (B, L, 3, heads, D), each written into one buffer, so the
        normed halves need no concatenation."""
        (B, N, _, heads, D), fp32, dev = qkv_x.shape, torch.float32, qkv_x.device
        S = N + qkv_y.shape[1]
        q, k, v = qkv_x.new_empty(3, B, S, heads, D, dtype=dtype).unbind(0)
        qk_norm_(qkv_x[:, :, 0], self.q_norm_x(dev, fp32), rotation, q[:, :N])
        qk_norm_(qkv_y[:, :, 0], self.q_norm_y(dev, fp32), None, q[:, N:])
        qk_norm_(qkv_x[:, :, 1], self.k_norm_x(dev, fp32), rotation, k[:, :N])
        qk_norm_(qkv_y[:, :, 1], self.k_norm_y(dev, fp32), None, k[:, N:])
        v[:, :N], v[:, N:] = qkv_x[:, :, 2], qkv_y[:, :, 2]
        return q, k, v

    def _joint_qkv_cat(
        self, qkv_x: torch.Tensor, qkv_y: torch.Tensor, rotation: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """:meth:`_joint_qkv_buffers` by concatenation, for ``torch.compile``: inductor fuses
        the concatenation, and writing into slices of one buffer made the traced graph
        specialise on N + L (a recompile per token count)."""
        fp32, dev = torch.float32, qkv_x.device
        norms = ((self.q_norm_x, self.q_norm_y), (self.k_norm_x, self.k_norm_y))
        q, k = (
            torch.cat([qk_norm(qkv_x[:, :, i], norm_x(dev, fp32), rotation).to(dtype),
                       qk_norm(qkv_y[:, :, i], norm_y(dev, fp32), None).to(dtype)], dim=1)
            for i, (norm_x, norm_y) in enumerate(norms)
        )  # fmt: skip
        v = torch.cat([qkv_x[:, :, 2], qkv_y[:, :, 2]], dim=1).to(dtype)
        return q, k, v


class AsymmetricJointBlock(nn.Module):
    """One joint block: modulated pre-norm attention and SwiGLU MLPs with tanh-gated sandwich
    norms on both streams; the last block (``update_y=False``) only reads the text."""

    def __init__(self, config: DiTConfig, update_y: bool, operations, device, dtype) -> None:
        super().__init__()
        dx, dy, kw = config.hidden_size_x, config.hidden_size_y, {"device": device, "dtype": dtype}
        self.update_y = update_y
        self.mod_x = operations.Linear(dx, 4 * dx, bias=True, **kw)
        self.mod_y = operations.Linear(dx, (4 if update_y else 1) * dy, bias=True, **kw)
        self.attn = AsymmetricAttention(config, update_y, operations, device, dtype)
        self.mlp_x = FeedForward(dx, config.mlp_hidden_x, operations, device, dtype)
        if update_y:
            self.mlp_y = FeedForward(dy, config.mlp_hidden_y, operations, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        c: torch.Tensor,
        rotation: torch.Tensor,
        valid: torch.Tensor | None,
        attention: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, Dx), y (B, L, Dy), c (B, Dx) → updated (x, y)."""
        c = F.silu(c)
        scale_msa_x, gate_msa_x, scale_mlp_x, gate_mlp_x = self.mod_x(c).chunk(4, dim=1)
        mod_y = self.mod_y(c).chunk(4 if self.update_y else 1, dim=1)
        attn_x, attn_y = self.attn(
            modulated_rmsnorm(x, scale_msa_x), modulated_rmsnorm(y, mod_y[0]), rotation,
            valid, attention,
        )  # fmt: skip
        x = gated_residual(x, attn_x, gate_msa_x)
        del attn_x
        mlp_residual_(x, self.mlp_x, scale_mlp_x, gate_mlp_x)
        if self.update_y:
            _, gate_msa_y, scale_mlp_y, gate_mlp_y = mod_y
            y = gated_residual(y, attn_y, gate_msa_y)
            mlp_residual_(y, self.mlp_y, scale_mlp_y, gate_mlp_y)
        return x, y


# Memory: the MLP sub-block runs on at most MLP_CHUNK tokens at a time, so its SwiGLU hidden
# state (2 × 8192 wide) holds ≤ 4096 × 16384 values instead of N × 16384 (2.9 GB in fp32 at
# 44,520 tokens). Tokens are independent in the MLP, so only the matmul blocking, not the math,
# depends on the chunking; chunks are large because each matmul call re-packs its weight.
MLP_CHUNK = 4096


def mlp_residual_(
    x: torch.Tensor, mlp: nn.Module, scale: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """In place ``x += RMSNorm(mlp(modulated_rmsnorm(x, scale)))·tanh(gate)``; returns x.

    Under ``torch.compile`` the chunks are ``MLP_CHUNK`` tokens long but for the last: the
    near-equal cut of :func:`token_chunks` would specialise the graph on the token count.
    """
    if torch.compiler.is_compiling():
        chunks = x.split(MLP_CHUNK, dim=1)
    else:
        chunks = [x[:, rows] for rows in token_chunks(x.shape[1], MLP_CHUNK)]
    for chunk in chunks:
        add_gated_(chunk, mlp(modulated_rmsnorm(chunk, scale)), gate)
    return x


class FinalLayer(nn.Module):
    """``linear(LayerNorm(x)·(1 + scale) + shift)`` with ``shift, scale = mod(SiLU(c))``."""

    def __init__(self, config: DiTConfig, operations, device, dtype) -> None:
        super().__init__()
        d, p, kw = config.hidden_size_x, config.patch_size, {"device": device, "dtype": dtype}
        self.mod = operations.Linear(d, 2 * d, bias=True, **kw)
        self.linear = operations.Linear(d, p * p * config.in_channels, bias=True, **kw)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) → (B, N, p·p·C); the norm and modulation run in fp32."""
        shift, scale = self.mod(F.silu(c)).float().chunk(2, dim=1)
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=MOD_NORM_EPS)
        normed = normed.mul_(1.0 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))
        return self.linear(normed.to(x.dtype))


# --------------------------------------------------------------------------------------------
# The model


def text_lengths(y_mask: torch.Tensor) -> torch.Tensor:
    """Number of real tokens per sample of a right-padded (B, L) bool mask → (B,) int64.

    Raises:
        ValueError: when a row is not a prefix of True values followed by False.
    """
    lengths = y_mask.sum(dim=1)
    prefix = torch.arange(y_mask.shape[1], device=y_mask.device) < lengths[:, None]
    if not torch.equal(prefix, y_mask.bool()):
        raise ValueError("y_mask must be right-padded: each row True for a prefix, then False")
    return lengths


def compute_dtype_for(stored: torch.dtype | None) -> torch.dtype:
    """The dtype the token streams compute in for block weights stored in ``stored``: the same
    when fp32/bf16/fp16, bf16 for anything else (fp8, quantized)."""
    return stored if stored in _FLOAT_COMPUTE else torch.bfloat16


_ROPE_KEY = "pos_frequencies"


def _genmo_rope_key(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: object
) -> None:
    """State-dict post-hook of :class:`AsymmDiT`: ``rope.weight`` is saved as Genmo's
    ``pos_frequencies``, in the same place of the key order."""
    items = [(prefix + _ROPE_KEY if k == prefix + "rope.weight" else k, v)
             for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)


class AsymmDiT(_KeepsFp32):
    """The Mochi 1 AsymmDiT (Genmo's ``AsymmDiTJoint``), Genmo checkpoint key names.

    The RoPE frequencies, Genmo's ``pos_frequencies`` (3, heads, head_dim/2), are held by a leaf
    module, ``rope`` (a :class:`~mochi_core.ops.Weight`), so that a host that places and
    casts leaf modules (ComfyUI's partial loading) reaches them; a tensor of the root module
    would be left behind. The checkpoint key stays ``pos_frequencies``: ``state_dict()``
    names it so and ``load_state_dict`` accepts it (the one conversion, in
    :meth:`_load_from_state_dict` and :func:`_genmo_rope_key`), and ``model.pos_frequencies``
    is the tensor.

    Args:
        config: hyper-parameters, e.g. ``DiTConfig.from_state_dict(sd)``.
        operations: layer factories (:data:`mochi_core.ops.cast` by default).
        device, dtype: where and in which dtype the Linear/Conv weights are created.
        attention: a backend name (``"sdpa"``, ``"flash"``, ``"sage"``) or an
            :data:`~mochi_core.attention.AttentionFn`.
        compute_dtype: dtype of the token streams; None derives it from the stored weights
            (their dtype when fp32/bf16/fp16, bf16 otherwise).
    """

    _fp32_params = ("rope.weight",)

    def __init__(
        self,
        config: DiTConfig,
        *,
        operations=ops.cast,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attention: str | AttentionFn = "sdpa",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention = get_attention(attention) if isinstance(attention, str) else attention
        self.compute_dtype = compute_dtype
        args = (operations, device, dtype)
        c = config
        self.rope = ops.weight_factory(operations)(
            (3, c.num_heads, c.head_dim // 2), device=device, dtype=torch.float32)
        self.register_state_dict_post_hook(_genmo_rope_key)
        self.x_embedder = PatchEmbed(c, *args)
        self.t_embedder = TimestepEmbedder(c, *args)
        self.t5_y_embedder = AttentionPool(c, *args)
        self.t5_yproj = operations.Linear(c.t5_feat_dim, c.hidden_size_y, bias=True,
                                          device=device, dtype=dtype)  # fmt: skip
        self.blocks = nn.ModuleList(
            AsymmetricJointBlock(c, i < c.depth - 1, *args) for i in range(c.depth)
        )
        self.final_layer = FinalLayer(c, *args)
        self.rope_cache = RopeCache()  # not a module or buffer: never in the state dict

    @property
    def pos_frequencies(self) -> torch.Tensor:
        """Genmo's ``pos_frequencies`` (3, heads, head_dim/2), fp32: the weight of ``rope``."""
        return self.rope.weight

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        if prefix + _ROPE_KEY in state_dict:  # Genmo's key -> the tensor of the leaf module
            state_dict[prefix + "rope.weight"] = state_dict.pop(prefix + _ROPE_KEY)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def release_caches(self) -> None:
        """Drop what the model keeps between forwards (the RoPE rotation of the last shape);
        the sampler calls it when a run ends."""
        self.rope_cache.clear()

    def resolved_compute_dtype(self) -> torch.dtype:
        """``compute_dtype`` if set, else :func:`compute_dtype_for` the stored block Linear
        weights (the bulk of the model)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        layer = self.blocks[0].attn.qkv_x if len(self.blocks) else self.t5_yproj
        return compute_dtype_for(getattr(getattr(layer, "weight", None), "dtype", None))

    def _conditioning(
        self, sigma: torch.Tensor, y_feat: torch.Tensor, y_mask: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c = t_emb + pooled caption (B, Dx), and the projected text tokens (B, L, Dy)."""
        t = (1.0 - sigma.float()) * self.config.timestep_scale
        y_feat = y_feat.to(dtype).masked_fill(~y_mask.unsqueeze(-1), 0.0)
        c = self.t_embedder(t, dtype) + self.t5_y_embedder(y_feat, y_mask)
        return c, self.t5_yproj(y_feat)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        y_feat: torch.Tensor,
        y_mask: torch.Tensor,
        *,
        rope_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: (B, C, T, H, W) latents in DiT space; H and W divisible by the patch size.
            sigma: (B,) noise level, 1 = pure noise (a 0-d tensor is broadcast).
            y_feat: (B, L, 4096) T5 features; padded rows are ignored.
            y_mask: (B, L) bool, a right-padded prefix of real tokens per row.
            rope_pos: optional (T·H/p·W/p, 3) positions from :func:`rope_positions`
                (e.g. a tile's positions on the whole canvas); default: the token grid's own.

        Returns:
            (B, C, T, H, W) fp32 velocity ``x₀ − ε``.
        """
        B, _, T, H, W = x.shape
        p, dtype = self.config.patch_size, self.resolved_compute_dtype()
        assert H % p == 0 and W % p == 0, f"latent H, W ({H}, {W}) must be divisible by {p}"
        assert y_feat.shape[:2] == y_mask.shape and y_mask.shape[0] == B, "y_feat/y_mask shapes"
        lengths = text_lengths(y_mask)
        L = int(lengths.max()) if B else 0
        y_mask = y_mask[:, :L].bool()
        c, y = self._conditioning(sigma.reshape(-1).expand(B), y_feat[:, :L], y_mask, dtype)
        x_tok = self.x_embedder(x.to(dtype))
        N = x_tok.shape[1]
        if rope_pos is None:
            rope_pos = rope_positions(T, H // p, W // p, device=x.device)
        assert rope_pos.shape == (N, 3), f"rope_pos must be ({N}, 3), got {tuple(rope_pos.shape)}"
        rotation = self.rope_cache.get(self.rope(x.device, torch.float32), rope_pos.to(x.device))
        valid = None
        if not bool((lengths == L).all()):
            valid = F.pad(y_mask, (N, 0), value=True)  # (B, N + L)
        for block in self.blocks:
            x_tok, y = block(x_tok, y, c, rotation, valid, self.attention)
        out = self.final_layer(x_tok, c)
        return rearrange(
            out.float(), "b (t hp wp) (p1 p2 c) -> b c t (hp p1) (wp p2)",
            t=T, hp=H // p, wp=W // p, p1=p, p2=p,
        )  # fmt: skip
