"""Checkpoint formats of Mochi 1: detection, conversion to Genmo keys, and loading.

Every format in circulation is recognised from its key set (and dtypes) alone, by reading only
the safetensors headers, and converted here, in one place, to the Genmo key names that the
modules of :mod:`mochi_core.dit` and :mod:`mochi_core.vae` use (SPEC §2):

DiT
    ``genmo`` (``dit.safetensors``, bare keys, fp32/bf16), ``comfy`` (``model.diffusion_model.``
    prefix), ``comfy_fp8_scaled`` (fp8 Linear weights, ``<m>.scale_weight``, optional
    ``<m>.scale_input``, a ``scaled_fp8`` marker), ``kijai_fp8`` (bare keys, fp8 weights, no
    scales), ``diffusers`` (``MochiTransformer3DModel``, one file or sharded with an index), and
    the DiT part of all-in-one checkpoints.
VAE
    ``genmo_decoder`` / ``genmo_encoder`` (bare keys; kijai's decoder file is the same),
    ``comfy_combined`` (``encoder.``/``decoder.`` prefixes), ``diffusers`` (``AutoencoderKLMochi``)
    and the ``vae.`` part of all-in-one checkpoints.
T5
    ``text_encoders.t5xxl.transformer.`` in all-in-one files, or a standalone T5-XXL encoder file
    with Hugging Face keys.

Conversions operate on plain ``dict[str, Tensor]`` and only concatenate, chunk and rename, so
they also run on ``meta`` tensors (the manifest tests convert the full-size key lists that way).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mochi_core import ops
from mochi_core.safetensors_io import CheckpointError, SafetensorsHeader, load_tensors, read_header

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "DetectedFormat",
    "LayerStorage",
    "MochiVAE",
    "detect_dit_format",
    "detect_file",
    "detect_format",
    "detect_vae_format",
    "diffusers_to_genmo_dit",
    "diffusers_to_genmo_vae",
    "dit_from_state_dict",
    "load_dit",
    "load_dit_state_dict",
    "load_t5",
    "load_t5_state_dict",
    "load_vae",
    "load_vae_state_dicts",
    "layer_storage",
]

COMFY_PREFIX = "model.diffusion_model."
VAE_PREFIX = "vae."
T5_PREFIX = "text_encoders.t5xxl.transformer."
FP8_MARKER = "scaled_fp8"

_DIT_MARKER = "t5_yproj.weight"
_DECODER_MARKER = "blocks.0.0.weight"
_DECODER_MARKER2 = "output_proj.weight"
_ENCODER_MARKER = "layers.0.weight"
_ENCODER_MARKER2 = "output_norm.weight"
_T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
_GGUF_SUFFIXES = (".Q8_0_qweight", ".Q4_0_qweight")


# --------------------------------------------------------------------------------------------
# Reading: one or several safetensors files seen as one key space
# --------------------------------------------------------------------------------------------


#: Called with every file a loader is about to read (the chosen file, the shards and the shard
#: index beside it); raises to refuse it. The nodes use it to keep reads inside the host's
#: model folders.
FileCheck = Callable[[Path], None]


def _checked(path: Path, check_file: FileCheck | None) -> Path:
    """``path``, after ``check_file`` accepted it."""
    if check_file is not None:
        check_file(path)
    return path


class CheckpointSource:
    """One checkpoint made of one or more safetensors files (diffusers shards), header-validated.

    ``dtypes`` maps every key to its stored torch dtype; ``load(keys)`` reads tensors lazily.
    ``check_file`` sees every file before its header is read.
    """

    def __init__(self, files: Sequence[Path | str], name: str | None = None,
                 check_file: FileCheck | None = None) -> None:
        self.files = [_checked(Path(f), check_file) for f in files]
        self.name = name or (self.files[0].name if len(self.files) == 1 else str(self.files[0]))
        self.headers: list[SafetensorsHeader] = [read_header(f) for f in self.files]
        self._owner: dict[str, SafetensorsHeader] = {}
        for header in self.headers:
            for key in header.tensors:
                if key in self._owner:
                    raise CheckpointError(f"{self.name}: tensor {key!r} appears in two shards")
                self._owner[key] = header

    @classmethod
    def open(cls, path: Path | str, component: str | None = None,
             check_file: FileCheck | None = None) -> CheckpointSource:
        """A file, or a diffusers directory (``component`` = subfolder such as ``"vae"``)."""
        return cls(resolve_files(path, component, check_file), name=Path(path).name,
                   check_file=check_file)

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Key -> stored dtype."""
        return {k: h.tensors[k].torch_dtype for k, h in self._owner.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> stored shape."""
        return {k: h.tensors[k].shape for k, h in self._owner.items()}

    def nbytes(self, keys: Iterable[str]) -> int:
        """Bytes stored for ``keys`` (what reading them reads)."""
        return sum(self._owner[k].tensors[k].end - self._owner[k].tensors[k].start for k in keys)

    @property
    def metadata(self) -> dict[str, str]:
        """``__metadata__`` of the first file."""
        return dict(self.headers[0].metadata)

    def load(
        self,
        keys: Iterable[str] | None = None,
        device: torch.device | str = "cpu",
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read ``keys`` (default all), file by file; ``transform`` as in :func:`load_tensors`."""
        wanted = list(self._owner) if keys is None else list(keys)
        out: dict[str, torch.Tensor] = {}
        for header in self.headers:
            mine = [k for k in wanted if self._owner.get(k) is header]
            if mine:
                out.update(load_tensors(header.path, mine, device=device, header=header,
                                        transform=transform))
        return out


def _index_shards(index: Path) -> list[Path]:
    """Shard files named by a diffusers ``*.safetensors.index.json`` (names only, same folder)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index.name}: unreadable shard index ({err})") from err
    if not names or not all(isinstance(n, str) and Path(n).name == n for n in names):
        raise CheckpointError(f"{index.name}: shard names must be plain file names")
    return [index.parent / n for n in names]


def _files_in_dir(folder: Path, check_file: FileCheck | None = None) -> list[Path]:
    """The checkpoint file(s) of a model folder: a shard index, else one .safetensors."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _index_shards(_checked(indexes[0], check_file))
    files = sorted(folder.glob("*.safetensors"))
    preferred = [f for f in files if f.name == "diffusion_pytorch_model.safetensors"]
    if preferred or len(files) == 1:
        return preferred or files
    names = [f.name for f in files]
    raise CheckpointError(f"{folder.name}: expected one .safetensors file or a shard index, "
                          f"found {names[:6] or 'none'}")


def _shard_set(path: Path, check_file: FileCheck | None = None) -> list[Path]:
    """All shards when ``path`` is one shard listed by an index beside it, else ``[path]``."""
    for index in sorted(path.parent.glob("*.safetensors.index.json")):
        shards = _index_shards(_checked(index, check_file))
        if path in shards:
            return shards
    return [path]


def resolve_files(path: Path | str, component: str | None = None,
                  check_file: FileCheck | None = None) -> list[Path]:
    """The safetensors file(s) behind ``path``: a file, a model folder or a diffusers repo.

    ``check_file`` sees every file read on the way (shard indexes) and every file returned,
    before any of them is read.
    """
    path = _checked(Path(path), check_file)
    if path.is_file():
        files = _shard_set(path, check_file)
    elif path.is_dir():
        if component and (path / component).is_dir():
            path = path / component
        files = _files_in_dir(path, check_file)
    else:
        raise CheckpointError(f"{path.name}: no such file or directory: {path}")
    return [_checked(f, check_file) for f in files]


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedFormat:
    """What a key set looks like: ``kind`` (dit/vae/t5/lora/all_in_one/unknown), a format
    ``name``, the ``parts`` present (VAE halves, all-in-one components) and a key ``prefix``."""

    kind: str
    name: str = ""
    parts: tuple[str, ...] = ()
    prefix: str = ""

    @property
    def description(self) -> str:
        """For example ``"dit/comfy_fp8_scaled"`` or ``"vae/comfy_combined (encoder+decoder)"``."""
        if self == EMPTY:
            return "an empty checkpoint (no tensors)"
        text = f"{self.kind}/{self.name}" if self.name else self.kind
        return f"{text} ({'+'.join(self.parts)})" if self.parts else text

    def __str__(self) -> str:
        return self.description


UNKNOWN = DetectedFormat("unknown")
EMPTY = DetectedFormat("unknown", "empty")


def _has_fp8(dtypes: Mapping[str, torch.dtype], keys: Iterable[str]) -> bool:
    """Whether any of ``keys`` is stored in an fp8 dtype."""
    return any(dtypes[k] in ops.FP8_DTYPES for k in keys)


def detect_dit_format(dtypes: Mapping[str, torch.dtype]) -> DetectedFormat | None:
    """The DiT format of a key -> dtype map, or ``None`` if it holds no Mochi DiT."""
    if "transformer_blocks.0.attn1.to_q.weight" in dtypes and "time_embed.caption_proj.weight" \
            in dtypes:
        return DetectedFormat("dit", "diffusers")
    for prefix in (COMFY_PREFIX, ""):
        if prefix + _DIT_MARKER in dtypes:
            break
    else:
        return None
    keys = [k for k in dtypes if k.startswith(prefix)]
    origin = "comfy" if prefix else "genmo"  # kijai's bf16 file is Genmo's layout
    if any(k.endswith(_GGUF_SUFFIXES) for k in keys):
        return DetectedFormat("dit", "kijai_gguf", prefix=prefix)
    if prefix + FP8_MARKER in dtypes or any(k.endswith(".scale_weight") for k in keys):
        return DetectedFormat("dit", "comfy_fp8_scaled", prefix=prefix)
    if _has_fp8(dtypes, keys):
        return DetectedFormat("dit", "comfy_fp8" if prefix else "kijai_fp8", prefix=prefix)
    return DetectedFormat("dit", origin, prefix=prefix)


def _halves(dtypes: Mapping[str, torch.dtype], prefix: str) -> tuple[str, ...]:
    """The Genmo VAE halves present under ``prefix`` + ``encoder.``/``decoder.``."""
    enc = {prefix + "encoder." + _ENCODER_MARKER, prefix + "encoder." + _ENCODER_MARKER2}
    dec = {prefix + "decoder." + _DECODER_MARKER, prefix + "decoder." + _DECODER_MARKER2}
    return tuple(name for name, marks in (("encoder", enc), ("decoder", dec))
                 if marks <= dtypes.keys())


def detect_vae_format(dtypes: Mapping[str, torch.dtype]) -> DetectedFormat | None:
    """The Mochi VAE format of a key -> dtype map (with the halves found), or ``None``."""
    diffusers = tuple(name for name, key in (("encoder", "encoder.proj_in.weight"),
                                             ("decoder", "decoder.up_blocks.0.proj.weight"))
                      if key in dtypes)
    if diffusers:
        return DetectedFormat("vae", "diffusers", diffusers)
    for prefix, name in ((VAE_PREFIX, "all_in_one"), ("", "comfy_combined")):
        halves = _halves(dtypes, prefix)
        if halves:
            return DetectedFormat("vae", name, halves, prefix)
    if _DIT_MARKER in dtypes:
        return None
    if {_DECODER_MARKER, _DECODER_MARKER2} <= dtypes.keys() and "blocks.1.proj.weight" in dtypes:
        return DetectedFormat("vae", "genmo_decoder", ("decoder",))
    if {_ENCODER_MARKER, _ENCODER_MARKER2} <= dtypes.keys():
        return DetectedFormat("vae", "genmo_encoder", ("encoder",))
    return None


def _detect_other(dtypes: Mapping[str, torch.dtype]) -> DetectedFormat:
    """T5, LoRA or foreign (Stable Diffusion) VAE key sets, no keys at all; else unknown."""
    keys = dtypes.keys()
    if not keys:
        return EMPTY
    if _T5_MARKER in keys or T5_PREFIX + _T5_MARKER in keys:
        return DetectedFormat("t5", "t5xxl_encoder", prefix=T5_PREFIX if T5_PREFIX + _T5_MARKER
                              in keys else "")
    if any(k.endswith((".lora_A", ".lora_B")) for k in keys):
        return DetectedFormat("lora", "genmo")
    if any(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in keys):
        return DetectedFormat("lora", "other")
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return DetectedFormat("unknown", "diffusion model of another architecture (not Mochi)")
    if any("decoder.up." in k or k.startswith("first_stage_model.") for k in keys):
        return DetectedFormat("vae", "stable_diffusion (not a Mochi VAE)")
    return UNKNOWN


def detect_format(dtypes: Mapping[str, torch.dtype]) -> DetectedFormat:
    """Classify a whole key -> dtype map (a file): DiT, VAE, T5, all-in-one, LoRA or unknown."""
    dit, vae = detect_dit_format(dtypes), detect_vae_format(dtypes)
    has_t5 = T5_PREFIX + _T5_MARKER in dtypes
    if dit is not None and (vae is not None or has_t5):
        parts = ("dit",) + (("vae:" + "+".join(vae.parts),) if vae else ()) + \
            (("t5",) if has_t5 else ())
        return DetectedFormat("all_in_one", dit.name, parts, dit.prefix)
    return dit or vae or _detect_other(dtypes)


def detect_file(path: Path | str) -> DetectedFormat:
    """Describe a checkpoint file or diffusers folder from its header(s) only.

    Raises :class:`CheckpointError` for unreadable, malformed or pickle files.
    """
    path = Path(path)
    if path.is_dir():
        for component in ("transformer", "vae"):
            if (path / component).is_dir():
                return detect_format(CheckpointSource.open(path, component).dtypes)
    return detect_format(CheckpointSource.open(path).dtypes)


# --------------------------------------------------------------------------------------------
# Conversions (pure key/tensor operations; also valid on meta tensors)
# --------------------------------------------------------------------------------------------

#: A rename rule maps one source key to ``(genmo_key, part)``; ``part`` is 0/1/2 for the q/k/v
#: pieces that are concatenated into one Genmo ``qkv`` weight, ``None`` otherwise.
Rename = Callable[[str], "tuple[str, int | None] | None"]

_QKV = {"q": 0, "k": 1, "v": 2}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """``[a; b] -> [b; a]`` along dim 0 (SwiGLU gate order and the final-layer mod order)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _rename_all(sd: Mapping[str, torch.Tensor], rename: Rename) -> dict[str, torch.Tensor]:
    """Apply ``rename`` to every key and concatenate q/k/v pieces in order.

    Keys that no rule knows, and incomplete q/k/v groups, are kept under their original names
    so that the key check reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        target = rename(key)
        if target is None:
            out[key] = value
        elif target[1] is None:
            out[target[0]] = value
        else:
            groups.setdefault(target[0], {})[target[1]] = (key, value)
    for target, pieces in groups.items():
        if sorted(pieces) == [0, 1, 2]:
            out[target] = torch.cat([pieces[i][1] for i in range(3)], dim=0)
        else:
            out.update(dict(pieces.values()))
    return out


def _sub(rules: Sequence[tuple[str, str]], key: str) -> str | None:
    """The first rule whose pattern matches all of ``key``, expanded; else None."""
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(template)
    return None


_DIT_TOP_RULES = (
    (r"pos_frequencies", "pos_frequencies"),
    (r"patch_embed\.proj\.(\w+)", r"x_embedder.proj.\1"),
    (r"time_embed\.timestep_embedder\.linear_1\.(\w+)", r"t_embedder.mlp.0.\1"),
    (r"time_embed\.timestep_embedder\.linear_2\.(\w+)", r"t_embedder.mlp.2.\1"),
    (r"time_embed\.pooler\.(to_kv|to_q|to_out)\.(\w+)", r"t5_y_embedder.\1.\2"),
    (r"time_embed\.caption_proj\.(\w+)", r"t5_yproj.\1"),
    (r"norm_out\.linear\.(\w+)", r"final_layer.mod.\1"),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1"),
)
_DIT_BLOCK_RULES = (
    (r"norm1\.linear\.(\w+)", r"mod_x.\1"),
    (r"norm1_context\.linear(?:_1)?\.(\w+)", r"mod_y.\1"),
    (r"attn1\.norm_q\.(\w+)", r"attn.q_norm_x.\1"),
    (r"attn1\.norm_k\.(\w+)", r"attn.k_norm_x.\1"),
    (r"attn1\.norm_added_q\.(\w+)", r"attn.q_norm_y.\1"),
    (r"attn1\.norm_added_k\.(\w+)", r"attn.k_norm_y.\1"),
    (r"attn1\.to_out\.0\.(\w+)", r"attn.proj_x.\1"),
    (r"attn1\.to_add_out\.(\w+)", r"attn.proj_y.\1"),
    (r"ff\.net\.0\.proj\.(\w+)", r"mlp_x.w1.\1"),
    (r"ff\.net\.2\.(\w+)", r"mlp_x.w2.\1"),
    (r"ff_context\.net\.0\.proj\.(\w+)", r"mlp_y.w1.\1"),
    (r"ff_context\.net\.2\.(\w+)", r"mlp_y.w2.\1"),
)


def _rename_diffusers_dit(key: str) -> tuple[str, int | None] | None:
    """One diffusers transformer key -> (Genmo key, q/k/v part or None)."""
    block = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
    if block is None:
        top = _sub(_DIT_TOP_RULES, key)
        return None if top is None else (top, None)
    i, rest = block.groups()
    qkv = re.fullmatch(r"attn1\.(?:to_([qkv])|add_([qkv])_proj)\.weight", rest)
    if qkv:
        stream = "x" if qkv.group(1) else "y"
        return f"blocks.{i}.attn.qkv_{stream}.weight", _QKV[qkv.group(1) or qkv.group(2)]
    sub = _sub(_DIT_BLOCK_RULES, rest)
    return None if sub is None else (f"blocks.{i}.{sub}", None)


_SWAPPED_DIT_KEYS = re.compile(r"blocks\.\d+\.mlp_[xy]\.w1\.weight|final_layer\.mod\.(weight|bias)")


def diffusers_to_genmo_dit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``MochiTransformer3DModel`` state dict to Genmo keys (SPEC §2.4).

    q/k/v are concatenated into ``qkv_x``/``qkv_y``; SwiGLU ``w1`` halves are swapped back (SiLU
    on the first half); ``norm_out`` ``[scale; shift]`` becomes ``final_layer.mod`` ``[shift;
    scale]``.
    """
    out = _rename_all(sd, _rename_diffusers_dit)
    for key in out:
        if _SWAPPED_DIT_KEYS.fullmatch(key) and key not in sd:
            out[key] = swap_halves(out[key])
    return out


_STACK = {"norm1.norm_layer": 0, "conv1.conv": 2, "norm2.norm_layer": 3, "conv2.conv": 5}
_RES = r"resnets\.(\d+)\.(norm1\.norm_layer|conv1\.conv|norm2\.norm_layer|conv2\.conv)\.(\w+)"
_ENCODER_TOP = (
    (r"proj_in\.(\w+)", r"layers.0.\1"),
    (r"norm_out\.norm_layer\.(\w+)", r"output_norm.\1"),
    (r"proj_out\.(\w+)", r"output_proj.\1"),
)


def _count_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct ``(\\d+)`` values of ``pattern`` at the start of the keys."""
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def _decoder_renamer(n_up: int) -> Rename:
    """Diffusers decoder key -> Genmo: ``blocks.0`` = conv_in + block_in, ``blocks.1..n_up`` =
    up blocks (res blocks + ``proj``), ``blocks.{n_up+1}`` = block_out, ``output_proj``."""
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"conv_in\.(\w+)", lambda m: f"blocks.0.0.{m[1]}"),
        (r"block_in\." + _RES, lambda m: f"blocks.0.{int(m[1]) + 1}.stack.{_STACK[m[2]]}.{m[3]}"),
        (r"up_blocks\.(\d+)\." + _RES,
         lambda m: f"blocks.{int(m[1]) + 1}.blocks.{m[2]}.stack.{_STACK[m[3]]}.{m[4]}"),
        (r"up_blocks\.(\d+)\.proj\.(\w+)", lambda m: f"blocks.{int(m[1]) + 1}.proj.{m[2]}"),
        (r"block_out\." + _RES,
         lambda m: f"blocks.{n_up + 1}.{m[1]}.stack.{_STACK[m[2]]}.{m[3]}"),
        (r"proj_out\.(\w+)", lambda m: f"output_proj.{m[1]}"),
    ]

    def rename(key: str) -> tuple[str, int | None] | None:
        for pattern, build in rules:
            match = re.fullmatch(pattern, key)
            if match:
                return build(match), None
        return None

    return rename


def _encoder_unit(key: str, layer: str) -> tuple[str, int | None] | None:
    """The part of a diffusers encoder key after ``<block>.<kind>.<j>.``, under Genmo ``layer``."""
    kind, rest = key.split(".", 1)
    if kind == "resnets" and (r := re.fullmatch(r"(\w+\.\w+)\.(\w+)", rest)) and r[1] in _STACK:
        return f"{layer}.stack.{_STACK[r[1]]}.{r[2]}", None
    if kind == "norms" and (r := re.fullmatch(r"norm_layer\.(\w+)", rest)):
        return f"{layer}.attn_block.norm.{r[1]}", None
    if kind == "attentions" and (r := re.fullmatch(r"to_([qkv])\.weight", rest)):
        return f"{layer}.attn_block.attn.qkv.weight", _QKV[r[1]]
    if kind == "attentions" and (r := re.fullmatch(r"to_out\.0\.(\w+)", rest)):
        return f"{layer}.attn_block.attn.out.{r[1]}", None
    return None


def _encoder_renamer(n_in: int, n_down: int) -> Rename:
    """Diffusers encoder key -> Genmo: ``layers.0`` = proj_in, ``layers.1..n_in`` = block_in,
    then one ``layers.i`` per down block (``layers.0`` its strided conv), then block_out."""

    def rename(key: str) -> tuple[str, int | None] | None:
        top = _sub(_ENCODER_TOP, key)
        if top is not None:
            return top, None
        if down := re.fullmatch(r"down_blocks\.(\d+)\.conv_in\.conv\.(\w+)", key):
            return f"layers.{int(down[1]) + 1 + n_in}.layers.0.{down[2]}", None
        m = re.fullmatch(r"(block_in|block_out|down_blocks\.(\d+))\.(\w+)\.(\d+)\.(.+)", key)
        if m is None:
            return None
        j = int(m[4])
        if m[1] == "block_in":
            layer = f"layers.{j + 1}"
        elif m[1] == "block_out":
            layer = f"layers.{j + 1 + n_in + n_down}"
        else:
            layer = f"layers.{int(m[2]) + 1 + n_in}.layers.{j + 1}"
        return _encoder_unit(f"{m[3]}.{m[5]}", layer)

    return rename


def diffusers_to_genmo_vae(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """Convert a diffusers ``AutoencoderKLMochi`` state dict to Genmo ``(encoder, decoder)``
    state dicts (SPEC §2.5; encoder attention q/k/v are concatenated into ``qkv``); a half that
    is absent is ``None``."""
    enc, dec = strip_prefix(sd, "encoder."), strip_prefix(sd, "decoder.")
    rename_enc = _encoder_renamer(_count_indices(enc, r"block_in\.resnets\.(\d+)\."),
                                  _count_indices(enc, r"down_blocks\.(\d+)\."))
    rename_dec = _decoder_renamer(_count_indices(dec, r"up_blocks\.(\d+)\."))
    return (_rename_all(enc, rename_enc) if enc else None,
            _rename_all(dec, rename_dec) if dec else None)


# --------------------------------------------------------------------------------------------
# fp8 "scaled" weights and storage dtypes
# --------------------------------------------------------------------------------------------

#: DiT tensors that stay fp32 whatever the storage dtype (SPEC §1.5, §8.5-6).
_FP32_KEYS = re.compile(r"pos_frequencies|.*norm.*")
#: DiT weights that are stored in fp8 when fp8 storage is asked for (the Linear layers of the
#: blocks; embedders, norms and the final layer stay in bf16, as in kijai's keep-list).
_FP8_KEYS = re.compile(r"blocks\.\d+\.(mod_[xy]|attn\.qkv_[xy]|attn\.proj_[xy]|mlp_[xy]\.w[12])"
                       r"\.weight")


def take_fp8_scales(
    sd: dict[str, torch.Tensor], name: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Normalise ComfyUI "scaled fp8" entries in place and return ``sd``.

    Drops the ``scaled_fp8`` marker and the ``<m>.scale_input`` entries (they only matter for fp8
    matmuls of the activations; our layers cast the weight instead), and reshapes every
    ``<m>.scale_weight`` to a 0-d fp32 tensor. A scale with more than one element is refused.
    """
    sd.pop(FP8_MARKER, None)
    dropped = [k for k in sd if k.endswith(".scale_input")]
    for key in dropped:
        del sd[key]
    if dropped:
        log.debug("%s: ignoring %d scale_input entries", name, len(dropped))
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        scale = sd[key]
        if scale.numel() != 1:
            raise CheckpointError(f"{name}: {key} has shape {tuple(scale.shape)}, expected a "
                                  "scalar per-layer scale")
        sd[key] = scale.reshape(()).float()
    return sd


def dequantize_fp8(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace every fp8 weight by ``weight * scale_weight`` in ``dtype``; drop the scales."""
    for key in [k for k, v in sd.items() if v.dtype in ops.FP8_DTYPES]:
        scale = sd.pop(key[: -len("weight")] + "scale_weight", None) \
            if key.endswith(".weight") else None
        value = sd[key].float()
        sd[key] = (value if scale is None else value * scale.float()).to(dtype)
    return sd


def quantize_fp8(weight: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8: ``(q, scale)`` with ``q * scale ≈ weight`` and ``|q| ≤ fp8 max``."""
    limit = torch.finfo(fp8).max
    w = weight.float()
    scale = (w.abs().amax() / limit).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-limit, limit).to(fp8), scale.reshape(())


def _cast_dit_entry(sd: dict[str, torch.Tensor], key: str, dtype: torch.dtype) -> None:
    """Apply the storage policy of :func:`cast_dit_state_dict` to one entry."""
    value = sd[key]
    if key.endswith(".scale_weight") or not value.is_floating_point():
        return
    if _FP32_KEYS.fullmatch(key):
        sd[key] = value.float()
    elif dtype in ops.FP8_DTYPES and _FP8_KEYS.fullmatch(key) and value.dim() == 2:
        if value.dtype != dtype:
            sd[key], sd[key[: -len("weight")] + "scale_weight"] = quantize_fp8(value, dtype)
    elif value.dtype != dtype:
        sd[key] = value.to(torch.bfloat16 if dtype in ops.FP8_DTYPES else dtype)


def _pre_cast(key: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The part of the storage policy that needs one tensor only, applied while reading.

    Non-fp8 floating tensors go to ``dtype`` (bf16 when fp8 storage is asked for: the fp8
    weights are quantized afterwards), norm weights and ``pos_frequencies`` to fp32. fp8 tensors
    and scales are left for :func:`cast_dit_state_dict`, which needs their pairs.
    """
    if dtype is None or not value.is_floating_point() or value.dtype in ops.FP8_DTYPES \
            or key.endswith((".scale_weight", ".scale_input")):
        return value
    if _FP32_KEYS.fullmatch(key):
        return value.float()
    return value.to(torch.bfloat16 if dtype in ops.FP8_DTYPES else dtype)


def cast_dit_state_dict(
    sd: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Apply the storage policy in place: norm weights and ``pos_frequencies`` fp32 always;
    ``dtype=None`` keeps the rest as stored; an fp8 ``dtype`` stores the block Linear weights in
    scaled fp8 and the rest in bf16; any other ``dtype`` dequantizes fp8 weights and casts."""
    if dtype is not None and dtype not in ops.FP8_DTYPES:
        dequantize_fp8(sd, dtype)
    elif dtype is not None:
        other = {v.dtype for v in sd.values()} & set(ops.FP8_DTYPES) - {dtype}
        if other:
            dequantize_fp8(sd, torch.float32)
    for key in list(sd):
        _cast_dit_entry(sd, key, dtype if dtype is not None else sd[key].dtype)
    return sd


# --------------------------------------------------------------------------------------------
# Loading into the models
# --------------------------------------------------------------------------------------------


def _key_report(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor]) -> str:
    """'' when keys and shapes agree, else the first missing/unexpected/mismatched keys."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in expected
                  if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    parts = [f"{what} ({len(keys)}): {', '.join(keys[:5])}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
             if keys]
    return "; ".join(parts)


def _fail_load(name: str, fmt: DetectedFormat | str, detail: str) -> CheckpointError:
    """A :class:`CheckpointError` naming the file and the format it looked like."""
    return CheckpointError(f"{name}: looks like {fmt}, but {detail}")


def _config(cls: type, sd: Mapping[str, torch.Tensor], name: str, fmt: DetectedFormat):
    """``cls.from_state_dict(sd)``, with failures reported as :class:`CheckpointError`."""
    try:
        return cls.from_state_dict(sd)
    except (KeyError, ValueError, AssertionError, IndexError, TypeError) as err:
        raise _fail_load(name, fmt, f"its hyper-parameters cannot be read ({err})") from err


def _prepare_scales(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Fit the fp8 scales of ``sd`` to the layers of ``model`` (built on meta).

    A Linear with a ``scale_weight`` *buffer* (:class:`mochi_core.ops.Linear`) that has an entry
    gets a meta buffer for it; a layer with a ``scale_weight`` *parameter* (a host's scaled-fp8
    layer, e.g. ComfyUI's) keeps its entry, and gets a scale of 1 where the file has none (its
    weight is not fp8); any other layer type gets its weight dequantized to bf16 instead.
    """
    for name, module in model.named_modules():
        for attr in ("scale_weight", "scale_input"):
            key = f"{name}.{attr}" if name else attr
            if module._parameters.get(attr) is not None and key not in sd:
                sd[key] = torch.ones((), dtype=torch.float32)
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        module_name = key[: -len(".scale_weight")]
        weight_key = module_name + ".weight"
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # reported by the key check
        if "scale_weight" in module._parameters:
            continue
        if "scale_weight" in module._buffers:
            module.scale_weight = torch.empty((), device="meta")
        elif weight_key in sd:
            scale = sd.pop(key)
            sd[weight_key] = (sd[weight_key].float() * scale).to(torch.bfloat16)


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], name: str,
              fmt: DetectedFormat | str) -> nn.Module:
    """Check keys and shapes against ``model`` (built on ``meta``), then load with
    ``assign=True, strict=True`` so every tensor keeps its stored dtype and device."""
    report = _key_report({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    if report:
        raise _fail_load(name, fmt, f"its keys do not fit the model: {report}")
    model.requires_grad_(False)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{name}: tensors left on the meta device after loading: {left[:5]}")
    return model.eval()


def _dit_part(src: CheckpointSource) -> tuple[DetectedFormat, str]:
    """The DiT format inside ``src`` and the key prefix to strip, or a clear error."""
    whole = detect_format(src.dtypes)
    fmt = detect_dit_format(src.dtypes) if whole.kind in ("dit", "all_in_one") else None
    if fmt is None:
        raise CheckpointError(f"{src.name}: not a Mochi DiT checkpoint; it looks like {whole}")
    if fmt.name == "kijai_gguf":
        raise CheckpointError(f"{src.name}: looks like {fmt}; GGUF-quantized DiT files are not "
                              "supported, use the bf16, fp8 or fp8-scaled file")
    return fmt, fmt.prefix


def load_dit_state_dict(
    path: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    check_file: FileCheck | None = None,
) -> tuple[dict[str, torch.Tensor], DetectedFormat, str]:
    """Read the DiT of any supported format as a Genmo-key state dict.

    Returns ``(state_dict, format, file name)``; fp8-scaled files keep their fp8 weights and
    0-d ``<m>.scale_weight`` entries. Only the DiT tensors of an all-in-one file are read.
    With a ``dtype``, non-fp8 tensors are cast as they are read (see :func:`_pre_cast`); call
    :func:`cast_dit_state_dict` to complete the storage policy. ``check_file`` sees every
    file (shards too) before it is read.
    """
    src = CheckpointSource.open(path, "transformer", check_file)
    fmt, prefix = _dit_part(src)
    n = len(prefix)
    keys = [k for k in src.dtypes if k.startswith(prefix)]
    # diffusers names contain "norm" wherever Genmo's do (and more: those become fp32 here and
    # are cast by cast_dit_state_dict after the renaming)
    sd = strip_prefix(src.load(keys, device, lambda k, v: _pre_cast(k[n:], v, dtype)), prefix)
    if fmt.name == "diffusers":
        sd = diffusers_to_genmo_dit(sd)
    log.info("%s: read the DiT (%s, %d tensors, %.1f MB)", src.name, fmt, len(sd),
             src.nbytes(keys) / 1e6)
    return take_fp8_scales(sd, src.name), fmt, src.name


@dataclass(frozen=True)
class LayerStorage:
    """How a DiT's layers are stored once loaded, for a host that picks its layer operations
    from it (``load_dit(..., operations=choose)``).

    Attributes:
        weight_dtype: the dtype of every Linear/Conv weight, or None when they differ (e.g. fp8
            block layers and bf16 embedders).
        compute_dtype: the dtype the model computes in (:func:`mochi_core.dit.compute_dtype_for`).
        scaled_fp8: the fp8 dtype of weights that carry a per-layer ``scale_weight``, or None.
    """

    weight_dtype: torch.dtype | None
    compute_dtype: torch.dtype
    scaled_fp8: torch.dtype | None


def layer_storage(sd: Mapping[str, torch.Tensor]) -> LayerStorage:
    """The :class:`LayerStorage` of a Genmo-keyed DiT state dict after the storage policy."""
    from mochi_core.dit import compute_dtype_for  # noqa: PLC0415

    layers = {k: v.dtype for k, v in sd.items()
              if k.endswith(".weight") and v.dim() >= 2 and not _FP32_KEYS.fullmatch(k)}
    dtypes = set(layers.values())
    scaled = {layers[k[: -len("scale_weight")] + "weight"] for k in sd
              if k.endswith(".scale_weight") and k[: -len("scale_weight")] + "weight" in layers}
    block = layers.get("blocks.0.attn.qkv_x.weight", layers.get("t5_yproj.weight"))
    return LayerStorage(dtypes.pop() if len(dtypes) == 1 else None, compute_dtype_for(block),
                        next((d for d in scaled if d in ops.FP8_DTYPES), None))


def load_dit(
    path: Path | str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    operations=ops.cast,
    attention: str = "sdpa",
    check_file: FileCheck | None = None,
) -> nn.Module:
    """Load a Mochi DiT (:class:`mochi_core.dit.AsymmDiT`) from any supported format.

    ``dtype`` is the *storage* dtype: ``None`` keeps the file's dtypes (fp8-scaled weights stay
    fp8 with their per-layer ``scale_weight``), ``torch.bfloat16``/``float16``/``float32``
    dequantize and cast, ``torch.float8_e4m3fn`` stores the block Linear weights in scaled fp8.
    Norm weights and ``pos_frequencies`` are fp32 in every case. Layers cast per call to the
    input's dtype (``operations``). Errors name the file, its apparent format and the first bad
    keys. ``check_file`` sees every file (shards too) before it is read.

    ``operations`` is a namespace of layer factories, or a function that is given the
    :class:`LayerStorage` of the loaded weights and returns one (a host choosing its own
    casting layers for them, e.g. ComfyUI's ``comfy.ops.pick_operations``).
    """
    sd, fmt, name = load_dit_state_dict(path, device=device, dtype=dtype, check_file=check_file)
    return dit_from_state_dict(sd, dtype=dtype, operations=operations, attention=attention,
                               name=name, fmt=fmt)  # fmt: skip


def dit_from_state_dict(
    sd: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    operations=ops.cast,
    attention: str = "sdpa",
    name: str = "state dict",
    fmt: DetectedFormat | str = "genmo",
) -> nn.Module:
    """The DiT holding a Genmo-keyed state dict ``sd`` (consumed) under the storage policy of
    ``dtype`` and the layers of ``operations``, as :func:`load_dit` builds it from a file."""
    from mochi_core.dit import AsymmDiT, DiTConfig  # noqa: PLC0415  (dit imports are heavy)

    config = _config(DiTConfig, sd, name, fmt)
    cast_dit_state_dict(sd, dtype)
    if not hasattr(operations, "Linear"):
        operations = operations(layer_storage(sd))
    model = AsymmDiT(config, operations=operations, device="meta", attention=attention)
    _prepare_scales(model, sd)
    return load_into(model, sd, name, fmt)


#: Where a file that is not a T5 belongs, by the kind it looks like.
_LOADER_HINTS = {"dit": "a Mochi DiT: choose it in Mochi 1 DiT Loader",
                 "vae": "a Mochi VAE: choose it in Mochi 1 VAE Loader",
                 "all_in_one": "a checkpoint without a T5 encoder",
                 "lora": "a LoRA: place it in models/loras"}


def _t5_source(path: Path | str, check_file: FileCheck | None = None) -> CheckpointSource:
    """The file, checked to hold a T5-XXL encoder (standalone or inside an all-in-one file)."""
    src = CheckpointSource.open(path, check_file=check_file)
    dtypes = src.dtypes
    if _T5_MARKER not in dtypes and T5_PREFIX + _T5_MARKER not in dtypes:
        fmt = detect_format(dtypes)
        hint = _LOADER_HINTS.get(fmt.kind) if "not a Mochi" not in fmt.name else None
        raise CheckpointError(f"{src.name}: no T5-XXL encoder found; it looks like {fmt}"
                              + (f" ({hint})" if hint else ""))
    if len(src.files) != 1:
        raise CheckpointError(f"{src.name}: sharded T5 folders are not supported; use a single "
                              "t5xxl .safetensors file")
    return src


def load_t5_state_dict(
    path: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    check_file: FileCheck | None = None,
) -> dict[str, torch.Tensor]:
    """The T5-XXL encoder weights (Hugging Face ``T5EncoderModel`` keys, in ``dtype``) of a
    standalone T5 file or of the ``text_encoders.t5xxl.transformer.`` part of an all-in-one
    checkpoint; fp8-scaled files are dequantized (see
    :func:`mochi_core.text.normalize_t5_state_dict`).
    """
    from mochi_core.safetensors_io import LazyTensors  # noqa: PLC0415
    from mochi_core.text import normalize_t5_state_dict  # noqa: PLC0415

    src = _t5_source(path, check_file)
    sd = normalize_t5_state_dict(LazyTensors(src.files[0], src.headers[0]), dtype)
    return {k: v.to(device) for k, v in sd.items()}


def load_t5(
    path: Path | str,
    tokenizer_dir: Path | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    check_file: FileCheck | None = None,
):
    """A :class:`mochi_core.text.T5Conditioner` from a T5 or all-in-one file, after checking
    that the file holds a T5 encoder: a clear error names the file and what it looks like, or
    the T5 weights that do not fit. ``check_file`` sees the file before it is read."""
    from mochi_core.safetensors_io import LazyTensors  # noqa: PLC0415
    from mochi_core.text import T5Conditioner  # noqa: PLC0415

    src = _t5_source(path, check_file)
    sd = LazyTensors(src.files[0], src.headers[0])
    try:
        return T5Conditioner.from_state_dict(sd, tokenizer_dir, dtype=dtype, device=device)
    except (ValueError, KeyError) as err:
        raise _fail_load(src.name, detect_format(src.dtypes), f"its weights do not fit a T5 "
                         f"encoder ({err})") from err


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


@dataclass
class MochiVAE:
    """The VAE halves that were found (either may be ``None``) and where they came from."""

    encoder: nn.Module | None = None
    decoder: nn.Module | None = None
    sources: tuple[str, ...] = ()

    @property
    def halves(self) -> tuple[str, ...]:
        """``("encoder", "decoder")``, or the one half present."""
        return tuple(n for n in ("encoder", "decoder") if getattr(self, n) is not None)


def _vae_halves_of(
    src: CheckpointSource, fmt: DetectedFormat, device: torch.device | str
) -> dict[str, dict[str, torch.Tensor]]:
    """Genmo-key state dicts of the halves in one source, keyed ``"encoder"``/``"decoder"``."""
    if fmt.name == "diffusers":
        enc, dec = diffusers_to_genmo_vae(src.load(
            [k for k in src.dtypes if k.startswith(("encoder.", "decoder."))], device))
        return {n: sd for n, sd in (("encoder", enc), ("decoder", dec)) if sd is not None}
    if fmt.name in ("genmo_decoder", "genmo_encoder"):
        return {fmt.parts[0]: src.load(None, device)}
    out = {}
    for half in fmt.parts:
        prefix = f"{fmt.prefix}{half}."
        out[half] = strip_prefix(src.load([k for k in src.dtypes if k.startswith(prefix)],
                                          device), prefix)
    return out


def load_vae_state_dicts(
    paths: Path | str | Sequence[Path | str], *, device: torch.device | str = "cpu",
    check_file: FileCheck | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], tuple[str, ...]]:
    """Read the VAE halves from one or more files/folders of any supported format.

    Returns ``({"encoder": sd, "decoder": sd}, descriptions)`` with Genmo keys; a half found in
    two inputs is an error. ``check_file`` sees every file (shards too) before it is read.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    sources = []
    for path in paths:
        src = CheckpointSource.open(path, "vae", check_file)
        fmt = detect_vae_format(src.dtypes)
        if fmt is None or not fmt.parts:
            raise CheckpointError(f"{src.name}: not a Mochi VAE checkpoint; it looks like "
                                  f"{detect_format(src.dtypes)}")
        for half, sd in _vae_halves_of(src, fmt, device).items():
            if half in halves:
                raise CheckpointError(f"{src.name}: a VAE {half} was already given")
            halves[half] = sd
        sources.append(f"{src.name}: {fmt}")
        log.info("%s: VAE %s", src.name, fmt)
    return halves, tuple(sources)


def _build_half(half: str, sd: dict[str, torch.Tensor], name: str, operations) -> nn.Module:
    """Build one VAE half on the meta device and load ``sd`` into it."""
    from mochi_core import vae  # noqa: PLC0415

    config_cls, model_cls = ((vae.EncoderConfig, vae.Encoder) if half == "encoder"
                             else (vae.DecoderConfig, vae.Decoder))
    fmt = f"a Mochi VAE {half}"
    config = _config(config_cls, sd, name, fmt)
    model = model_cls(config, operations=operations, device="meta")
    return load_into(model, sd, name, fmt)


def load_vae(
    paths: Path | str | Sequence[Path | str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    operations=ops.cast,
    check_file: FileCheck | None = None,
) -> MochiVAE:
    """Load the Mochi VAE encoder and/or decoder from one or more checkpoints.

    ``dtype=None`` keeps the stored dtype; otherwise every floating tensor is cast to ``dtype``.
    Layers cast per call to the input's dtype. ``check_file`` sees every file before it is read.
    """
    halves, sources = load_vae_state_dicts(paths, device=device, check_file=check_file)
    name = ", ".join(s.split(":")[0] for s in sources)
    built = {}
    for half, sd in halves.items():
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        built[half] = _build_half(half, sd, name, operations)
    return MochiVAE(built.get("encoder"), built.get("decoder"), sources)
