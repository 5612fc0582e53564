"""Small random-weight checkpoints in the real key layouts, for tests and ``--demo`` runs.

Three files, each in a layout that real checkpoints use, at reduced widths so the whole
pipeline runs on a CPU in about a minute while still going through every module:

* ``mochi_demo_dit.safetensors``: the DiT with Genmo's key names (``dit.safetensors`` layout),
  two joint blocks (one full, one reduced "last" block), width 128/64, 2 heads of 64;
* ``mochi_demo_vae.safetensors``: ComfyUI's combined ``mochi_vae.safetensors`` layout
  (``encoder.`` + Genmo encoder keys, ``decoder.`` + Genmo decoder keys), widths 32–64, one
  ResBlock per level;
* ``t5xxl_demo_fp16.safetensors``: T5 v1.1 in ComfyUI's ``text_encoders`` layout, fp16,
  2 layers of width 64 but the **real vocabulary size 32128**, so the real tokenizer works.

The weights are random, so a "video" made with them is structured noise. Every file carries the
safetensors metadata tag :data:`DEMO_TAG` saying so.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: safetensors metadata key (and value) marking random demo weights.
DEMO_TAG = "mochi_nodes_demo"
DEMO_NOTE = "RANDOM demo weights: outputs are noise, not a Mochi video"
DEMO_VERSION = "1"
T5_VOCAB = 32128


@dataclass(frozen=True)
class DemoDiTSize:
    """Reduced DiT widths (full size: depth 48, 3072/1536, 24 heads, MLP 8192/4096, T5 4096)."""

    depth: int = 2
    hidden_x: int = 128
    hidden_y: int = 64
    heads: int = 2
    mlp_x: int = 512
    mlp_y: int = 256
    t5_dim: int = 64
    timestep_dim: int = 256


@dataclass(frozen=True)
class DemoT5Size:
    """Reduced T5 v1.1 (full XXL: d_model 4096, 24 layers, 64 heads of 64, d_ff 10240)."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_kv: int = 16
    d_ff: int = 128
    vocab: int = T5_VOCAB
    buckets: int = 32


@dataclass(frozen=True)
class DemoCheckpoints:
    """Paths of a demo checkpoint set."""

    dit: Path
    vae: Path
    t5: Path


class _Rand:
    """Deterministic tensor factory over one CPU generator."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * std + mean

    def weight(self, out: int, fan_in: int, *kernel: int) -> torch.Tensor:
        """A weight ``out × fan_in × kernel…`` with std 1/√(fan_in·∏kernel)."""
        return self.normal(out, fan_in, *kernel, std=1.0 / math.sqrt(fan_in * math.prod(kernel)))

    def bias(self, n: int, std: float = 0.02) -> torch.Tensor:
        return self.normal(n, std=std)

    def norm(self, n: int) -> torch.Tensor:
        """A norm weight near 1."""
        return self.normal(n, std=0.1, mean=1.0)

    def layer(self, sd: dict, name: str, out: int, fan_in: int, *kernel: int,
              bias: float | None = 0.02) -> None:  # fmt: skip
        """Add ``name.weight`` (and ``name.bias`` with std ``bias`` unless None) to ``sd``."""
        sd[name + ".weight"] = self.weight(out, fan_in, *kernel)
        if bias is not None:
            sd[name + ".bias"] = self.bias(out, bias)


# --------------------------------------------------------------------------------------------
# DiT (Genmo keys, SPEC §2.1)


def _dit_block(r: _Rand, s: DemoDiTSize, i: int, last: bool) -> dict[str, torch.Tensor]:
    x, y, hd = s.hidden_x, s.hidden_y, s.hidden_x // s.heads
    p, sd = f"blocks.{i}.", {}
    r.layer(sd, p + "mod_x", 4 * x, x, bias=0.1)
    r.layer(sd, p + "mod_y", y if last else 4 * y, x, bias=0.1)
    r.layer(sd, p + "attn.qkv_x", 3 * x, x, bias=None)
    r.layer(sd, p + "attn.qkv_y", 3 * x, y, bias=None)
    for norm in ("q_norm_x", "k_norm_x", "q_norm_y", "k_norm_y"):
        sd[p + f"attn.{norm}.weight"] = r.norm(hd)
    r.layer(sd, p + "attn.proj_x", x, x)
    r.layer(sd, p + "mlp_x.w1", 2 * s.mlp_x, x, bias=None)
    r.layer(sd, p + "mlp_x.w2", x, s.mlp_x, bias=None)
    if not last:  # the last block neither projects nor updates the text stream
        r.layer(sd, p + "attn.proj_y", y, x)
        r.layer(sd, p + "mlp_y.w1", 2 * s.mlp_y, y, bias=None)
        r.layer(sd, p + "mlp_y.w2", y, s.mlp_y, bias=None)
    return sd


def _rope_frequencies(r: _Rand, heads: int, half: int) -> torch.Tensor:
    """(3, heads, half) frequencies: log-spaced magnitudes with random jitter."""
    base = torch.logspace(0, -3, half).expand(3, heads, half)
    return base * r.normal(3, heads, half, std=0.3, mean=1.0)


def random_dit_state_dict(
    seed: int = 0, size: DemoDiTSize | None = None
) -> dict[str, torch.Tensor]:
    """A random AsymmDiT state dict with Genmo key names (fp32)."""
    s, r = size or DemoDiTSize(), _Rand(seed)
    x, y, t5 = s.hidden_x, s.hidden_y, s.t5_dim
    sd = {"pos_frequencies": _rope_frequencies(r, s.heads, s.hidden_x // s.heads // 2)}
    r.layer(sd, "x_embedder.proj", x, 12, 2, 2)
    r.layer(sd, "t_embedder.mlp.0", x, s.timestep_dim)
    r.layer(sd, "t_embedder.mlp.2", x, x)
    r.layer(sd, "t5_y_embedder.to_kv", 2 * t5, t5)
    r.layer(sd, "t5_y_embedder.to_q", t5, t5)
    r.layer(sd, "t5_y_embedder.to_out", x, t5)
    r.layer(sd, "t5_yproj", y, t5)
    for i in range(s.depth):
        sd |= _dit_block(r, s, i, last=i == s.depth - 1)
    r.layer(sd, "final_layer.mod", 2 * x, x, bias=0.1)
    r.layer(sd, "final_layer.linear", 48, x)
    return sd


# --------------------------------------------------------------------------------------------
# VAE (Genmo decoder/encoder keys, SPEC §2.5, §3.3, §3.4)


def _res_block(r: _Rand, p: str, c: int, attention: bool = False) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for norm, conv in ((".stack.0", ".stack.2"), (".stack.3", ".stack.5")):
        sd[p + norm + ".weight"], sd[p + norm + ".bias"] = r.norm(c), r.bias(c)
        r.layer(sd, p + conv, c, c, 3, 3, 3)
    if attention:
        a = p + ".attn_block."
        sd[a + "norm.weight"], sd[a + "norm.bias"] = r.norm(c), r.bias(c)
        r.layer(sd, a + "attn.qkv", 3 * c, c, bias=None)
        r.layer(sd, a + "attn.out", c, c)
    return sd


def random_decoder_state_dict(
    seed: int = 0, channels: tuple[int, ...] = (32, 32, 64, 64)
) -> dict[str, torch.Tensor]:
    """A Genmo-keyed decoder: one ResBlock per level, temporal ×1, ×2, ×3 like the real one.

    ``channels`` go from the pixel level to the latent level (full size 128, 256, 512, 768).
    """
    r, ch, temporal = _Rand(seed), channels, (1, 2, 3)
    sd: dict[str, torch.Tensor] = {}
    r.layer(sd, "blocks.0.0", ch[-1], 12, 1, 1, 1)
    sd |= _res_block(r, "blocks.0.1", ch[-1])
    levels = len(ch) - 1
    for b in range(1, levels + 1):
        c_in, c_out, t = ch[-b], ch[-b - 1], temporal[-b]
        sd |= _res_block(r, f"blocks.{b}.blocks.0", c_in)
        r.layer(sd, f"blocks.{b}.proj", c_out * t * 4, c_in)
    sd |= _res_block(r, f"blocks.{levels + 1}.0", ch[0])
    r.layer(sd, "output_proj", 3, ch[0])
    return sd


def random_encoder_state_dict(
    seed: int = 0, channels: tuple[int, ...] = (32, 32, 64, 64)
) -> dict[str, torch.Tensor]:
    """A Genmo-keyed encoder: 15 Fourier channels in, one ResBlock per level, attention after
    the first level, reductions ×1, ×2, ×3 in time and ×2 in space (full widths 64…384)."""
    r, ch, temporal = _Rand(seed), channels, (1, 2, 3)
    sd: dict[str, torch.Tensor] = {}
    r.layer(sd, "layers.0", ch[0], 15)
    sd |= _res_block(r, "layers.1", ch[0])
    for i in range(len(ch) - 1):
        p = f"layers.{2 + i}.layers."
        r.layer(sd, p + "0", ch[i + 1], ch[i], temporal[i], 2, 2)
        sd |= _res_block(r, p + "1", ch[i + 1], attention=True)
    sd |= _res_block(r, f"layers.{len(ch) + 1}", ch[-1], attention=True)
    sd["output_norm.weight"], sd["output_norm.bias"] = r.norm(ch[-1]), r.bias(ch[-1])
    r.layer(sd, "output_proj", 24, ch[-1], bias=None)
    return sd


# --------------------------------------------------------------------------------------------
# T5 (ComfyUI text_encoders layout = Hugging Face T5EncoderModel keys without the tied copy)


def random_t5_state_dict(seed: int = 0, size: DemoT5Size | None = None) -> dict[str, torch.Tensor]:
    """A random T5 v1.1 encoder (gated-GELU) with ComfyUI ``t5xxl_*.safetensors`` keys (fp32)."""
    s, r = size or DemoT5Size(), _Rand(seed)
    d, inner = s.d_model, s.num_heads * s.d_kv
    sd = {"shared.weight": r.normal(s.vocab, d)}
    for i in range(s.num_layers):
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        for name in ("q", "k", "v"):
            r.layer(sd, a + "SelfAttention." + name, inner, d, bias=None)
        r.layer(sd, a + "SelfAttention.o", d, inner, bias=None)
        if i == 0:  # only the first block holds the (shared) relative position bias
            bias = r.normal(s.buckets, s.num_heads)
            sd[a + "SelfAttention.relative_attention_bias.weight"] = bias
        sd[a + "layer_norm.weight"] = r.norm(d)
        r.layer(sd, f + "DenseReluDense.wi_0", s.d_ff, d, bias=None)
        r.layer(sd, f + "DenseReluDense.wi_1", s.d_ff, d, bias=None)
        r.layer(sd, f + "DenseReluDense.wo", d, s.d_ff, bias=None)
        sd[f + "layer_norm.weight"] = r.norm(d)
    sd["encoder.final_layer_norm.weight"] = r.norm(d)
    return sd


# --------------------------------------------------------------------------------------------
# Files


def _metadata(kind: str, seed: int) -> dict[str, str]:
    return {DEMO_TAG: DEMO_NOTE, "kind": kind, "seed": str(seed), "version": DEMO_VERSION}


def is_demo_file(path: str | Path) -> bool:
    """Whether a safetensors file carries the random-demo-weights tag."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt") as f:
        return DEMO_TAG in (f.metadata() or {})


def _write(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _current(path: Path, metadata: dict[str, str]) -> bool:
    from safetensors import safe_open  # noqa: PLC0415

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}) == metadata
    except Exception:  # a partial or foreign file: regenerate it
        return False


def make_demo_checkpoints(directory: str | Path, *, seed: int = 0) -> DemoCheckpoints:
    """Write (or reuse, when already written with this seed) the demo set in ``directory``.

    Returns:
        the paths of the DiT, VAE (combined) and T5 files.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = DemoCheckpoints(
        root / "mochi_demo_dit.safetensors", root / "mochi_demo_vae.safetensors",
        root / "t5xxl_demo_fp16.safetensors",
    )  # fmt: skip
    makers = {
        "dit": lambda: random_dit_state_dict(seed),
        "vae": lambda: {
            **{"encoder." + k: v for k, v in random_encoder_state_dict(seed + 1).items()},
            **{"decoder." + k: v for k, v in random_decoder_state_dict(seed + 2).items()},
        },
        "t5": lambda: {k: v.half() for k, v in random_t5_state_dict(seed + 3).items()},
    }
    for kind, make in makers.items():
        path, meta = getattr(paths, kind), _metadata(kind, seed)
        if _current(path, meta):
            continue
        _write(path, make(), meta)
    log.warning("demo checkpoints in %s: %s", root, DEMO_NOTE)
    return paths
