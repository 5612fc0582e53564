"""Full-size key/shape checks against the manifests of the real Mochi files (SPEC §2, keys/).

The models are built on the meta device (no memory), and the diffusers manifests are converted
to Genmo keys on meta tensors with the same converters the loaders use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mochi_core import checkpoints as ck
from tests.conftest import KEYS_DIR


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from ``keys/<name>_keys.tsv``."""
    out = {}
    for line in (Path(KEYS_DIR) / f"{name}_keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return out


def meta_state_dict(shapes: dict[str, tuple[int, ...]], dtype=torch.float32) -> dict:
    """Meta tensors of the given shapes (no storage)."""
    return {k: torch.empty(s, device="meta", dtype=dtype) for k, s in shapes.items()}


def shapes_of(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same_keys(got: dict, want: dict) -> None:
    """Equal key sets and shapes, with the first differences in the message."""
    report = ck._key_report(want, meta_state_dict(got))
    assert not report, report
    assert set(got) == set(want)


@pytest.fixture(scope="module")
def genmo_dit() -> dict[str, tuple[int, ...]]:
    return read_manifest("genmo_dit")


def test_manifest_sizes_match_spec(genmo_dit):
    assert len(genmo_dit) == 879
    total = sum(torch.Size(s).numel() for s in genmo_dit.values())
    assert total == 10_027_677_744


def test_full_size_dit_matches_genmo_manifest(genmo_dit):
    from mochi_core.dit import AsymmDiT, DiTConfig

    model = AsymmDiT(DiTConfig.mochi_preview(), device="meta")
    assert_same_keys(shapes_of(model.state_dict()), genmo_dit)
    assert DiTConfig.from_state_dict(meta_state_dict(genmo_dit)) == DiTConfig.mochi_preview()


@pytest.mark.parametrize("half", ["decoder", "encoder"])
def test_full_size_vae_matches_genmo_manifest(half):
    from mochi_core import vae

    manifest = read_manifest(f"genmo_{half}")
    cls, config_cls = (vae.Decoder, vae.DecoderConfig) if half == "decoder" else (
        vae.Encoder, vae.EncoderConfig)
    model = cls(config_cls(), device="meta")
    assert_same_keys(shapes_of(model.state_dict()), manifest)
    assert config_cls.from_state_dict(meta_state_dict(manifest)) == config_cls()


def test_diffusers_transformer_manifest_converts_to_genmo(genmo_dit):
    diffusers = meta_state_dict(read_manifest("diffusers_transformer"))
    assert ck.detect_dit_format({k: v.dtype for k, v in diffusers.items()}).name == "diffusers"
    assert_same_keys(shapes_of(ck.diffusers_to_genmo_dit(diffusers)), genmo_dit)


def test_diffusers_vae_manifest_converts_to_genmo():
    diffusers = meta_state_dict(read_manifest("diffusers_vae"))
    fmt = ck.detect_vae_format({k: v.dtype for k, v in diffusers.items()})
    assert (fmt.name, fmt.parts) == ("diffusers", ("encoder", "decoder"))
    enc, dec = ck.diffusers_to_genmo_vae(diffusers)
    assert_same_keys(shapes_of(enc), read_manifest("genmo_encoder"))
    assert_same_keys(shapes_of(dec), read_manifest("genmo_decoder"))


def test_comfy_prefixed_and_fp8_scaled_manifests_detect_and_strip(genmo_dit):
    bf16 = {ck.COMFY_PREFIX + k: torch.bfloat16 for k in genmo_dit}
    assert ck.detect_format(bf16).description == "dit/comfy"
    fp8 = dict(bf16)
    linears = [k for k, s in genmo_dit.items() if k.startswith("blocks.") and len(s) == 2]
    for key in linears:
        fp8[ck.COMFY_PREFIX + key] = torch.float8_e4m3fn
        fp8[ck.COMFY_PREFIX + key[: -len("weight")] + "scale_weight"] = torch.float32
    fp8[ck.COMFY_PREFIX + "scaled_fp8"] = torch.float8_e4m3fn
    assert ck.detect_format(fp8).description == "dit/comfy_fp8_scaled"
    bare = {k: torch.float8_e4m3fn if k in linears else torch.bfloat16 for k in genmo_dit}
    assert ck.detect_format(bare).description == "dit/kijai_fp8"
    shapes = {k: () if k.endswith(("scale_weight", "scaled_fp8")) else
              genmo_dit[k[len(ck.COMFY_PREFIX):]] for k in fp8}
    sd = ck.take_fp8_scales(ck.strip_prefix(meta_state_dict(shapes), ck.COMFY_PREFIX))
    weights = {k: v for k, v in sd.items() if not k.endswith(".scale_weight")}
    assert_same_keys(shapes_of(weights), genmo_dit)
    assert len(sd) - len(weights) == len(linears)
    # every scale finds its Linear in the full-size model, which then expects exactly these keys
    from mochi_core.dit import AsymmDiT, DiTConfig

    model = AsymmDiT(DiTConfig.mochi_preview(), device="meta")
    ck._prepare_scales(model, sd)
    assert not ck._key_report(shapes_of(model.state_dict()), sd)


def test_all_in_one_manifest_detection(genmo_dit):
    keys = {ck.COMFY_PREFIX + k: torch.bfloat16 for k in genmo_dit}
    for half in ("encoder", "decoder"):
        keys.update({f"vae.{half}.{k}": torch.bfloat16 for k in read_manifest(f"genmo_{half}")})
    keys[ck.T5_PREFIX + "encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.bfloat16
    fmt = ck.detect_format(keys)
    assert fmt.kind == "all_in_one"
    assert fmt.parts == ("dit", "vae:encoder+decoder", "t5")
    assert ck.detect_vae_format(keys).prefix == "vae."
