"""Independent implementations of the Mochi DiT used as test oracles, and random weights.

* :func:`random_dit_state_dict` makes Genmo-keyed random weights scaled so that activations stay
  O(1) (fan-in scaled Linear/Conv weights, small biases, QK-norm weights near 1, RoPE frequencies
  that give angles of a few radians over the canvas).
* :func:`genmo_to_diffusers_dit` converts them to diffusers keys (SPEC §2.4); it is written here,
  independently of ``mochi_core.checkpoints``, so the diffusers oracle does not share our code.
* :func:`diffusers_dit` and :func:`comfy_dit` build ``diffusers.MochiTransformer3DModel`` and the
  host's ``AsymmDiTJoint`` on the meta device and load the weights by assignment (no copies).

Calling conventions (read from their code): diffusers takes ``timestep = (1 − σ)·1000`` and
returns ``v``; the host takes ``σ`` (it embeds ``1 − σ`` itself), crops the text to
``num_tokens`` (ComfyUI passes ``max(1, mask.sum())``) and returns ``−v``.
"""

from __future__ import annotations

import math
import re

import torch

from mochi_core.dit import DiTConfig

__all__ = [
    "comfy_dit",
    "comfy_velocity",
    "diffusers_dit",
    "diffusers_velocity",
    "genmo_to_diffusers_dit",
    "random_dit_state_dict",
]


# --------------------------------------------------------------------------------------------
# Random Genmo-keyed weights


def _dit_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every Genmo key of a DiT with ``config`` and its shape."""
    c, hx, hy = config, config.hidden_size_x, config.hidden_size_y
    p, e = c.patch_size, c.t5_feat_dim
    shapes: dict[str, tuple[int, ...]] = {
        "pos_frequencies": (3, c.num_heads, c.head_dim // 2),
        "x_embedder.proj.weight": (hx, c.in_channels, p, p), "x_embedder.proj.bias": (hx,),
        "t_embedder.mlp.0.weight": (hx, c.timestep_dim), "t_embedder.mlp.0.bias": (hx,),
        "t_embedder.mlp.2.weight": (hx, hx), "t_embedder.mlp.2.bias": (hx,),
        "t5_y_embedder.to_kv.weight": (2 * e, e), "t5_y_embedder.to_kv.bias": (2 * e,),
        "t5_y_embedder.to_q.weight": (e, e), "t5_y_embedder.to_q.bias": (e,),
        "t5_y_embedder.to_out.weight": (hx, e), "t5_y_embedder.to_out.bias": (hx,),
        "t5_yproj.weight": (hy, e), "t5_yproj.bias": (hy,),
        "final_layer.mod.weight": (2 * hx, hx), "final_layer.mod.bias": (2 * hx,),
        "final_layer.linear.weight": (p * p * c.in_channels, hx),
        "final_layer.linear.bias": (p * p * c.in_channels,),
    }  # fmt: skip
    for i in range(c.depth):
        last = i == c.depth - 1
        b = f"blocks.{i}."
        shapes |= {
            b + "mod_x.weight": (4 * hx, hx), b + "mod_x.bias": (4 * hx,),
            b + "mod_y.weight": ((1 if last else 4) * hy, hx),
            b + "mod_y.bias": ((1 if last else 4) * hy,),
            b + "attn.qkv_x.weight": (3 * hx, hx), b + "attn.qkv_y.weight": (3 * hx, hy),
            b + "attn.proj_x.weight": (hx, hx), b + "attn.proj_x.bias": (hx,),
            b + "mlp_x.w1.weight": (2 * c.mlp_hidden_x, hx),
            b + "mlp_x.w2.weight": (hx, c.mlp_hidden_x),
        }  # fmt: skip
        for norm in ("q_norm_x", "k_norm_x", "q_norm_y", "k_norm_y"):
            shapes[f"{b}attn.{norm}.weight"] = (c.head_dim,)
        if not last:
            shapes |= {
                b + "attn.proj_y.weight": (hy, hx), b + "attn.proj_y.bias": (hy,),
                b + "mlp_y.w1.weight": (2 * c.mlp_hidden_y, hy),
                b + "mlp_y.w2.weight": (hy, c.mlp_hidden_y),
            }  # fmt: skip
    return shapes


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """fp32 random values for ``key``: scaled so every layer's output is O(1)."""
    noise = torch.randn(shape, generator=gen)
    if key == "pos_frequencies":
        return noise * 0.05  # angles of a few radians across the ±~100 position range
    if re.search(r"_norm_[xy]\.weight$", key):
        return 1.0 + 0.1 * noise
    if key.endswith(".bias"):
        return 0.05 * noise
    fan_in = math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


def random_dit_state_dict(
    config: DiTConfig, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random Genmo-keyed DiT weights for ``config`` (drawn in fp32 on the CPU, then cast)."""
    return {
        key: _random_tensor(key, shape, generator).to(dtype)
        for key, shape in _dit_shapes(config).items()
    }


# --------------------------------------------------------------------------------------------
# diffusers


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """``[a; b] -> [b; a]`` along dim 0."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


_DIFFUSERS_RENAMES = [
    (r"^x_embedder\.proj\.", "patch_embed.proj."),
    (r"^t_embedder\.mlp\.0\.", "time_embed.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "time_embed.timestep_embedder.linear_2."),
    (r"^t5_y_embedder\.", "time_embed.pooler."),
    (r"^t5_yproj\.", "time_embed.caption_proj."),
    (r"^final_layer\.mod\.", "norm_out.linear."),
    (r"^final_layer\.linear\.", "proj_out."),
    (r"\.mod_x\.", ".norm1.linear."),
    (r"\.attn\.q_norm_x\.", ".attn1.norm_q."),
    (r"\.attn\.k_norm_x\.", ".attn1.norm_k."),
    (r"\.attn\.q_norm_y\.", ".attn1.norm_added_q."),
    (r"\.attn\.k_norm_y\.", ".attn1.norm_added_k."),
    (r"\.attn\.proj_x\.", ".attn1.to_out.0."),
    (r"\.attn\.proj_y\.", ".attn1.to_add_out."),
    (r"\.mlp_x\.w1\.", ".ff.net.0.proj."),
    (r"\.mlp_x\.w2\.", ".ff.net.2."),
    (r"\.mlp_y\.w1\.", ".ff_context.net.0.proj."),
    (r"\.mlp_y\.w2\.", ".ff_context.net.2."),
    (r"^blocks\.", "transformer_blocks."),
]


def genmo_to_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Genmo-keyed DiT state dict to ``MochiTransformer3DModel`` keys (SPEC §2.4).

    Fused ``qkv_x``/``qkv_y`` split into q, k, v; SwiGLU ``w1`` halves swapped (diffusers applies
    SiLU to the second half); the final modulation ``[shift; scale]`` becomes ``[scale; shift]``;
    the last block's scale-only ``mod_y`` goes to ``norm1_context.linear_1``.
    """
    last = max(int(m[1]) for key in sd if (m := re.match(r"blocks\.(\d+)\.", key)))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        qkv = re.match(r"blocks\.(\d+)\.attn\.qkv_([xy])\.weight$", key)
        if qkv:
            names = ("to_q", "to_k", "to_v") if qkv[2] == "x" else (
                "add_q_proj", "add_k_proj", "add_v_proj")  # fmt: skip
            for name, part in zip(names, value.chunk(3, dim=0), strict=True):
                out[f"transformer_blocks.{qkv[1]}.attn1.{name}.weight"] = part
            continue
        if re.search(r"\.w1\.weight$", key) or key.startswith("final_layer.mod."):
            value = _swap_halves(value)
        context = ".norm1_context.linear_1." if key.startswith(f"blocks.{last}.") else (
            ".norm1_context.linear.")  # fmt: skip
        new = re.sub(r"\.mod_y\.", context, key)
        for pattern, replacement in _DIFFUSERS_RENAMES:
            new = re.sub(pattern, replacement, new)
        out[new] = value
    return out


def diffusers_dit(config: DiTConfig, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``diffusers.MochiTransformer3DModel`` matching ``config``, holding Genmo weights ``sd``."""
    from diffusers import MochiTransformer3DModel  # noqa: PLC0415

    for width, name in ((config.hidden_size_x, "x"), (config.hidden_size_y, "y")):
        inner = config.mlp_hidden_x if name == "x" else config.mlp_hidden_y
        if inner != 8 * width // 3:
            raise ValueError(f"diffusers fixes the {name} MLP width to 8·{width}//3, not {inner}")
    if config.pool_heads != 8 or config.timestep_scale != 1000.0:
        raise ValueError("diffusers fixes 8 pooling heads and the timestep scale 1000")
    with torch.device("meta"):
        model = MochiTransformer3DModel(
            patch_size=config.patch_size, num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim, num_layers=config.depth,
            pooled_projection_dim=config.hidden_size_y, in_channels=config.in_channels,
            text_embed_dim=config.t5_feat_dim, time_embed_dim=config.timestep_dim,
        )  # fmt: skip
    model.load_state_dict(genmo_to_diffusers_dit(sd), strict=True, assign=True)
    return model.eval()


def diffusers_velocity(
    model: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    y_feat: torch.Tensor,
    y_mask: torch.Tensor,
) -> torch.Tensor:
    """Velocity ``v`` from the diffusers model: it takes ``timestep = (1 − σ)·1000``."""
    with torch.no_grad():
        (out,) = model(
            hidden_states=x, encoder_hidden_states=y_feat, timestep=(1.0 - sigma) * 1000.0,
            encoder_attention_mask=y_mask, return_dict=False,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# The ComfyUI host's model


def comfy_dit(config: DiTConfig, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The host's ``AsymmDiTJoint`` built like ComfyUI's detector does, holding ``sd``.

    The host asserts a visual MLP width of 8192 (``hidden_x·mlp_ratio_x == 12288``); for other
    widths (tiny configs) its ``mlp_x`` modules are rebuilt with the host's own ``FeedForward``.
    The host's FeedForward rounds widths up to a multiple of 256, so widths must be multiples.
    """
    from tests.conftest import import_host  # noqa: PLC0415

    import_host()
    import comfy.ops  # noqa: PLC0415
    from comfy.ldm.genmo.joint_model.asymm_models_joint import AsymmDiTJoint  # noqa: PLC0415
    from comfy.ldm.genmo.joint_model.layers import FeedForward  # noqa: PLC0415

    hx, hy = config.hidden_size_x, config.hidden_size_y
    if config.mlp_hidden_x % 256 or config.mlp_hidden_y % 256:
        raise ValueError("the host's FeedForward needs MLP widths that are multiples of 256")
    ops = comfy.ops.disable_weight_init
    model = AsymmDiTJoint(
        patch_size=config.patch_size, in_channels=config.in_channels, hidden_size_x=hx,
        hidden_size_y=hy, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio_x=12288 / hx, mlp_ratio_y=1.5 * config.mlp_hidden_y / hy,
        learn_sigma=False, use_t5=True, t5_feat_dim=config.t5_feat_dim, t5_token_length=256,
        patch_embed_bias=True, timestep_mlp_bias=True, timestep_scale=config.timestep_scale,
        qk_norm=True, qkv_bias=False, out_bias=True, attn_drop=0.0, attend_to_padding=False,
        posenc_preserve_area=True, rope_theta=10000.0, image_model="mochi_preview",
        device="meta", dtype=torch.float32, operations=ops,
    )  # fmt: skip
    if config.mlp_hidden_x != 8192:
        for block in model.blocks:
            block.mlp_x = FeedForward(hx, int(1.5 * config.mlp_hidden_x), 256, None,
                                      device="meta", operations=ops)  # fmt: skip
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def comfy_velocity(
    model: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    y_feat: torch.Tensor,
    y_mask: torch.Tensor,
) -> torch.Tensor:
    """Velocity ``v`` from the host model, called as ComfyUI does.

    ComfyUI passes σ as ``timestep``, ``num_tokens = max(1, mask.sum())`` (summed over the whole
    batch) and the model returns ``−v``; the sign is flipped back here.
    """
    num_tokens = max(1, int(y_mask.sum()))
    with torch.no_grad():
        out = model(x, sigma, context=y_feat, attention_mask=y_mask, num_tokens=num_tokens)
    return -out
