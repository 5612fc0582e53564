"""Writers of small random checkpoints in every real Mochi file format (SPEC §2).

Each writer takes Genmo-keyed fp32 state dicts of a scaled-down model, writes the file(s) with
the exact key layout and dtypes of the real format, and returns the path together with
``written``: the same tensors in Genmo key space *as stored* (dtype included, fp8 scales as
``<m>.scale_weight``), which is what a loader must reproduce bit for bit.

The genmo -> diffusers conversions here are written independently of the loaders' converters
(explicit name tables, the inverse direction), so the round trip checks both.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.vae import Decoder, DecoderConfig, Encoder, EncoderConfig

COMFY = "model.diffusion_model."
T5 = "text_encoders.t5xxl.transformer."
FP8 = torch.float8_e4m3fn

SMALL_DIT = DiTConfig(depth=2, hidden_size_x=64, hidden_size_y=32, num_heads=4, mlp_hidden_x=128,
                      mlp_hidden_y=64, t5_feat_dim=64, pool_heads=8)
SMALL_DECODER = DecoderConfig(channels=(32, 32, 32, 64), num_res_blocks=(1, 1, 1, 1, 1))
SMALL_ENCODER = EncoderConfig(channels=(32, 32, 64, 64), num_res_blocks=(1, 1, 1, 1, 1))

#: kijai keeps parameters whose name contains one of these in bf16 (SPEC §2.3).
KIJAI_KEEP = ("t_embedder", "x_embedder", "pos_frequencies", "t5", "norm")


def _randomize(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.2
        out[key] = t + 1.0 if "norm" in key and key.endswith("weight") else t
    return out


def _meta_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def genmo_dit_state_dict(seed: int = 0, config: DiTConfig = SMALL_DIT) -> dict[str, torch.Tensor]:
    """Random fp32 Genmo-keyed DiT weights of a small config."""
    return _randomize(_meta_shapes(AsymmDiT(config, device="meta")), seed)


def genmo_decoder_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random fp32 Genmo-keyed decoder weights of a small config."""
    return _randomize(_meta_shapes(Decoder(SMALL_DECODER, device="meta")), seed)


def genmo_encoder_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    """Random fp32 Genmo-keyed encoder weights of a small config."""
    return _randomize(_meta_shapes(Encoder(SMALL_ENCODER, device="meta")), seed)


def t5_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    """A few tensors with Hugging Face T5 encoder key names (not a working T5)."""
    shapes = {"shared.weight": (32, 16), "encoder.final_layer_norm.weight": (16,),
              **{f"encoder.block.0.layer.0.SelfAttention.{p}.weight": (16, 16) for p in "qkvo"}}
    return _randomize({k: torch.Size(v) for k, v in shapes.items()}, seed)


def run_dit(model: torch.nn.Module) -> torch.Tensor:
    """One forward of a SMALL_DIT-shaped model on fixed random inputs (3 padded text tokens)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 2, 4, 4, generator=g)
    y = torch.randn(1, 8, SMALL_DIT.t5_feat_dim, generator=g)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        return model(x, torch.tensor([0.7]), y, mask)


def _save(path: Path, sd: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _as_stored(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in sd.items()}


# ---- DiT --------------------------------------------------------------------------------------


def write_genmo_dit(folder: Path, sd: dict, dtype: torch.dtype = torch.float32):
    """Genmo ``dit.safetensors``: bare keys, one dtype."""
    written = _as_stored(sd, dtype)
    return _save(folder / "dit.safetensors", written), written


def write_comfy_dit(folder: Path, sd: dict):
    """Comfy-Org repackaged ``mochi_preview_bf16.safetensors``: prefixed keys, bf16."""
    written = _as_stored(sd, torch.bfloat16)
    path = _save(folder / "mochi_preview_bf16.safetensors",
                 {COMFY + k: v for k, v in written.items()})
    return path, written


def _is_block_linear(key: str, value: torch.Tensor) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2


def write_comfy_fp8_scaled(folder: Path, sd: dict, scale_input: bool = True):
    """ComfyUI ``mochi_preview_fp8_scaled.safetensors``: fp8 block Linear weights with fp32
    0-d ``scale_weight`` (and ``scale_input``), a ``scaled_fp8`` marker, the rest bf16."""
    written, stored = {}, {}
    for key, value in sd.items():
        if _is_block_linear(key, value):
            scale = value.abs().amax() / 448.0
            module = key[: -len("weight")]
            written[key] = (value / scale).to(FP8)
            written[module + "scale_weight"] = scale.reshape(()).float()
            if scale_input:
                stored[COMFY + module + "scale_input"] = torch.ones(())
        else:
            written[key] = value.to(torch.bfloat16)
    stored.update({COMFY + k: v for k, v in written.items()})
    stored[COMFY + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return _save(folder / "mochi_preview_fp8_scaled.safetensors", stored), written


def write_kijai_dit(folder: Path, sd: dict, fp8: bool = True):
    """kijai ``mochi_preview_dit_{fp8_e4m3fn,bf16}.safetensors``: bare keys, keep-list in bf16,
    everything else fp8 (unscaled) or bf16."""
    main = FP8 if fp8 else torch.bfloat16
    written = {k: v.to(torch.bfloat16 if any(s in k for s in KIJAI_KEEP) else main)
               for k, v in sd.items()}
    name = f"mochi_preview_dit_{'fp8_e4m3fn' if fp8 else 'bf16'}.safetensors"
    return _save(folder / name, written), written


_DIT_TOP = {"x_embedder.proj": "patch_embed.proj", "t_embedder.mlp.0":
            "time_embed.timestep_embedder.linear_1", "t_embedder.mlp.2":
            "time_embed.timestep_embedder.linear_2", "t5_y_embedder.to_kv":
            "time_embed.pooler.to_kv", "t5_y_embedder.to_q": "time_embed.pooler.to_q",
            "t5_y_embedder.to_out": "time_embed.pooler.to_out", "t5_yproj":
            "time_embed.caption_proj", "final_layer.mod": "norm_out.linear",
            "final_layer.linear": "proj_out"}
_DIT_BLOCK = {"mod_x": "norm1.linear", "mod_y": "norm1_context.linear", "attn.q_norm_x":
              "attn1.norm_q", "attn.k_norm_x": "attn1.norm_k", "attn.q_norm_y":
              "attn1.norm_added_q", "attn.k_norm_y": "attn1.norm_added_k", "attn.proj_x":
              "attn1.to_out.0", "attn.proj_y": "attn1.to_add_out", "mlp_x.w1": "ff.net.0.proj",
              "mlp_x.w2": "ff.net.2", "mlp_y.w1": "ff_context.net.0.proj", "mlp_y.w2":
              "ff_context.net.2"}


def _swap(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def genmo_to_diffusers_dit(sd: dict) -> dict:
    """Genmo -> diffusers ``MochiTransformer3DModel`` keys (SPEC §2.4), for writing fixtures."""
    out = {"pos_frequencies": sd["pos_frequencies"]}
    for key, value in sd.items():
        if "." not in key:
            continue
        module, param = key.rsplit(".", 1)
        if module in _DIT_TOP:
            out[f"{_DIT_TOP[module]}.{param}"] = _swap(value) if module == "final_layer.mod" \
                else value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if m is None:
            continue
        i, name = m.groups()
        base = f"transformer_blocks.{i}."
        if name in ("attn.qkv_x", "attn.qkv_y"):
            names = ("to_q", "to_k", "to_v") if name.endswith("x") else \
                ("add_q_proj", "add_k_proj", "add_v_proj")
            for n, piece in zip(names, value.chunk(3), strict=True):
                out[f"{base}attn1.{n}.weight"] = piece
            continue
        target = _DIT_BLOCK[name]
        if name == "mod_y" and f"blocks.{i}.mlp_y.w1.weight" not in sd:
            target = "norm1_context.linear_1"
        out[f"{base}{target}.{param}"] = _swap(value) if name.endswith("w1") else value
    return out


def write_diffusers_transformer(root: Path, sd: dict, shards: int = 2):
    """A diffusers repo folder with ``transformer/`` sharded into ``shards`` files + index."""
    diff = genmo_to_diffusers_dit(sd)
    folder = root / "transformer"
    keys = list(diff)
    weight_map = {}
    for s in range(shards):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: diff[k] for k in keys[s::shards]}
        _save(folder / name, part)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "MochiTransformer3DModel"}))
    return root, dict(sd)


# ---- VAE --------------------------------------------------------------------------------------


def write_genmo_vae(folder: Path, enc: dict, dec: dict):
    """Genmo ``encoder.safetensors`` and ``decoder.safetensors`` (bare keys, fp32); kijai's
    decoder file has the same layout."""
    return (_save(folder / "encoder.safetensors", enc), _save(folder / "decoder.safetensors", dec))


def write_comfy_vae(folder: Path, enc: dict, dec: dict):
    """ComfyUI ``mochi_vae.safetensors``: ``encoder.``/``decoder.`` prefixes, bf16."""
    written = {"encoder": _as_stored(enc, torch.bfloat16),
               "decoder": _as_stored(dec, torch.bfloat16)}
    flat = {f"{h}.{k}": v for h, sd in written.items() for k, v in sd.items()}
    return _save(folder / "mochi_vae.safetensors", flat), written


_SUB = {"0": "norm1.norm_layer", "2": "conv1.conv", "3": "norm2.norm_layer", "5": "conv2.conv"}


def _genmo_decoder_to_diffusers(sd: dict) -> dict:
    last = max(int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"blocks\.0\.0\.(\w+)", key):
            out[f"conv_in.{m[1]}"] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.(\d+)\.stack\.(\d)\.(\w+)", key):
            block = "block_in" if m[1] == "0" else "block_out"
            j = int(m[2]) - 1 if m[1] == "0" else int(m[2])
            assert m[1] in ("0", str(last))
            out[f"{block}.resnets.{j}.{_SUB[m[3]]}.{m[4]}"] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.blocks\.(\d+)\.stack\.(\d)\.(\w+)", key):
            out[f"up_blocks.{int(m[1]) - 1}.resnets.{m[2]}.{_SUB[m[3]]}.{m[4]}"] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.proj\.(\w+)", key):
            out[f"up_blocks.{int(m[1]) - 1}.proj.{m[2]}"] = value
        else:
            out[key.replace("output_proj", "proj_out")] = value
    return out


def _encoder_unit_to_diffusers(prefix: str, j: int, rest: str, value, out: dict) -> None:
    if m := re.fullmatch(r"stack\.(\d)\.(\w+)", rest):
        out[f"{prefix}.resnets.{j}.{_SUB[m[1]]}.{m[2]}"] = value
    elif m := re.fullmatch(r"attn_block\.norm\.(\w+)", rest):
        out[f"{prefix}.norms.{j}.norm_layer.{m[1]}"] = value
    elif rest == "attn_block.attn.qkv.weight":
        for n, piece in zip("qkv", value.chunk(3), strict=True):
            out[f"{prefix}.attentions.{j}.to_{n}.weight"] = piece
    elif m := re.fullmatch(r"attn_block\.attn\.out\.(\w+)", rest):
        out[f"{prefix}.attentions.{j}.to_out.0.{m[1]}"] = value
    else:
        raise KeyError(rest)


def _genmo_encoder_to_diffusers(sd: dict) -> dict:
    downs = sorted({int(m[1]) for k in sd if (m := re.match(r"layers\.(\d+)\.layers\.", k))})
    n_in = downs[0] - 1
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"layers\.0\.(\w+)", key):
            out[f"proj_in.{m[1]}"] = value
        elif m := re.fullmatch(r"layers\.(\d+)\.layers\.0\.(\w+)", key):
            out[f"down_blocks.{downs.index(int(m[1]))}.conv_in.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"layers\.(\d+)\.layers\.(\d+)\.(.+)", key):
            _encoder_unit_to_diffusers(f"down_blocks.{downs.index(int(m[1]))}", int(m[2]) - 1,
                                       m[3], value, out)
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
            i = int(m[1])
            if i <= n_in:
                block, j = "block_in", i - 1
            else:
                block, j = "block_out", i - 1 - n_in - len(downs)
            _encoder_unit_to_diffusers(block, j, m[2], value, out)
        else:
            out[key.replace("output_norm", "norm_out.norm_layer").replace("output_proj",
                                                                           "proj_out")] = value
    return out


def genmo_to_diffusers_vae(enc: dict | None, dec: dict | None) -> dict:
    """Genmo encoder/decoder -> one diffusers ``AutoencoderKLMochi`` state dict (SPEC §2.5)."""
    out = {}
    if enc is not None:
        out.update({f"encoder.{k}": v for k, v in _genmo_encoder_to_diffusers(enc).items()})
    if dec is not None:
        out.update({f"decoder.{k}": v for k, v in _genmo_decoder_to_diffusers(dec).items()})
    return out


def write_diffusers_vae(root: Path, enc: dict, dec: dict):
    """A diffusers repo folder with ``vae/diffusion_pytorch_model.safetensors``."""
    _save(root / "vae" / "diffusion_pytorch_model.safetensors", genmo_to_diffusers_vae(enc, dec))
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    return root


# ---- all-in-one, foreign and hostile files -----------------------------------------------------


def write_all_in_one(folder: Path, dit: dict, enc: dict, dec: dict, t5: dict):
    """An all-in-one checkpoint: ``model.diffusion_model.`` + ``vae.`` + T5, bf16."""
    flat = {COMFY + k: v for k, v in _as_stored(dit, torch.bfloat16).items()}
    for half, sd in (("encoder", enc), ("decoder", dec)):
        flat.update({f"vae.{half}.{k}": v for k, v in _as_stored(sd, torch.bfloat16).items()})
    flat.update({T5 + k: v for k, v in _as_stored(t5, torch.bfloat16).items()})
    return _save(folder / "mochi_all_in_one.safetensors", flat)


def write_sd_vae_like(folder: Path):
    """A Stable-Diffusion-style VAE (wrong model for Mochi)."""
    sd = {"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
          "decoder.up.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
          "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}
    return _save(folder / "sd_vae.safetensors", sd)


class _TouchOnUnpickle:
    """Unpickling this object creates ``marker`` (a harmless stand-in for a malicious payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def pickle_payload(marker: Path) -> bytes:
    """Pickle bytes that create ``marker`` when unpickled."""
    return pickle.dumps(_TouchOnUnpickle(Path(marker)), protocol=4)


def write_pickle_files(folder: Path, marker: Path) -> list[Path]:
    """The payload as ``.ckpt``/``.pt``/``.bin``, disguised as ``.safetensors`` (raw pickle and
    torch.save zip)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = pickle_payload(marker)
    paths = []
    for name in ("model.ckpt", "model.pt", "pytorch_model.bin", "disguised.safetensors"):
        (folder / name).write_bytes(payload)
        paths.append(folder / name)
    zipped = folder / "zipped.safetensors"
    torch.save({"state_dict": _TouchOnUnpickle(Path(marker))}, zipped)
    return [*paths, zipped]
