"""Genmo LoRA files: merge, strength, scale from metadata, exact removal, mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mochi_core.checkpoints import detect_file, load_dit
from mochi_core.lora import apply_lora, load_lora, lora_from_state_dict
from mochi_core.safetensors_io import CheckpointError
from tests import fixtures_formats as ff

TARGETS = ["blocks.0.attn.qkv_x", "blocks.0.attn.qkv_y", "blocks.0.attn.proj_x",
           "blocks.0.attn.proj_y", "blocks.1.attn.qkv_x", "blocks.1.attn.qkv_y",
           "blocks.1.attn.proj_x"]  # block 1 is the last block: it has no proj_y


def lora_tensors(model: torch.nn.Module, rank: int = 4, seed: int = 5) -> dict:
    """Random Genmo-format LoRA tensors (fp32) for TARGETS of ``model``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in TARGETS:
        out, inp = model.get_submodule(name).weight.shape
        sd[f"{name}.lora_A"] = torch.randn(rank, inp, generator=g) * 0.3
        sd[f"{name}.lora_B"] = torch.randn(out, rank, generator=g) * 0.3
    return sd


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("lora_dit")
    sd = ff.genmo_dit_state_dict(seed=7)
    return {"fp32": ff.write_genmo_dit(d / "a", sd)[0],
            "bf16": ff.write_genmo_dit(d / "b", sd, torch.bfloat16)[0],
            "fp8": ff.write_comfy_fp8_scaled(d / "c", sd)[0]}


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_and_remove_round_trip_exact(dit_files, tmp_path):
    model = load_dit(dit_files["bf16"])
    before, params = snapshot(model), {n: model.get_submodule(n).weight for n in TARGETS}
    reference = ff.run_dit(model)
    save_file(lora_tensors(model), str(tmp_path / "l.safetensors"))
    handle = apply_lora(model, load_lora(tmp_path / "l.safetensors"), strength=1.0)
    assert set(handle.layers) == set(TARGETS)
    assert not torch.equal(ff.run_dit(model), reference)
    handle.remove()
    after = model.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert all(model.get_submodule(n).weight is params[n] for n in TARGETS)
    assert torch.equal(ff.run_dit(model), reference)
    handle.remove()  # idempotent


def test_merged_weight_and_strength_scaling(dit_files):
    model = load_dit(dit_files["fp32"])
    lora = lora_from_state_dict(lora_tensors(model))
    w0 = model.blocks[0].attn.qkv_y.weight.clone()
    layer = lora.layers["blocks.0.attn.qkv_y"]
    for strength in (1.0, 0.5, -2.0):
        with apply_lora(model, lora, strength):
            got = model.blocks[0].attn.qkv_y.weight
            want = w0 + strength * (layer.up @ layer.down)
            assert torch.allclose(got, want, rtol=0, atol=1e-5)
        assert torch.equal(model.blocks[0].attn.qkv_y.weight, w0)


def test_scale_from_metadata_and_per_layer_alpha(dit_files, tmp_path):
    model = load_dit(dit_files["fp32"])
    sd = lora_tensors(model, rank=4)
    kwargs = {"qkv_proj_lora_rank": 4, "qkv_proj_lora_alpha": 8, "out_proj_lora_rank": 4,
              "out_proj_lora_alpha": 2, "qkv_proj_lora_dropout": 0.0}
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"kwargs": json.dumps(kwargs)})
    lora = load_lora(tmp_path / "m.safetensors")
    assert detect_file(tmp_path / "m.safetensors").description == "lora/genmo"
    assert lora.layers["blocks.1.attn.qkv_y"].scale == 2.0
    assert lora.layers["blocks.0.attn.proj_y"].scale == 0.5
    assert lora_from_state_dict(sd).layers["blocks.0.attn.qkv_x"].scale == 1.0
    sd["blocks.0.attn.qkv_x.alpha"] = torch.tensor(1.0)
    assert lora_from_state_dict(sd).layers["blocks.0.attn.qkv_x"].scale == 0.25
    w0 = model.blocks[0].attn.proj_y.weight.clone()
    layer = lora.layers["blocks.0.attn.proj_y"]
    with apply_lora(model, lora):
        want = w0 + 0.5 * (layer.up @ layer.down)
        assert torch.allclose(model.blocks[0].attn.proj_y.weight, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefix", ["diffusion_model.", "model.diffusion_model."])
def test_prefixed_keys_are_accepted(dit_files, prefix):
    model = load_dit(dit_files["fp32"])
    lora = lora_from_state_dict({prefix + k: v for k, v in lora_tensors(model).items()})
    assert set(lora.layers) == set(TARGETS)


def test_fp8_scaled_model_merges_in_bf16_and_restores_fp8(dit_files):
    model = load_dit(dit_files["fp8"])
    qkv = model.blocks[0].attn.qkv_x
    weight, scale = qkv.weight, qkv.scale_weight
    lora = lora_from_state_dict(lora_tensors(model))
    reference = ff.run_dit(model)
    handle = apply_lora(model, lora, 0.7)
    assert qkv.weight.dtype == torch.bfloat16 and qkv.scale_weight is None
    delta = 0.7 * lora.layers["blocks.0.attn.qkv_x"].delta()
    assert torch.equal(qkv.weight, (weight.float() * scale + delta).bfloat16())
    assert not torch.equal(ff.run_dit(model), reference)
    handle.remove()
    assert qkv.weight is weight and qkv.scale_weight is scale
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(ff.run_dit(model), reference)


def test_stacked_loras_remove_in_reverse_order_only(dit_files):
    model = load_dit(dit_files["fp8"])
    before = snapshot(model)
    first = apply_lora(model, lora_from_state_dict(lora_tensors(model, seed=1)), 0.5)
    after_first = snapshot(model)
    second = apply_lora(model, lora_from_state_dict(lora_tensors(model, seed=2)), 1.0)
    with pytest.raises(RuntimeError, match="remove the later LoRA first"):
        first.remove()
    second.remove()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in after_first.items())
    first.remove()
    state = model.state_dict()
    assert set(state) == set(before)
    assert all(state[k].dtype == v.dtype and torch.equal(state[k].float(), v.float())
               for k, v in before.items())


def test_lora_for_another_model_fails_and_changes_nothing(dit_files):
    model = load_dit(dit_files["fp32"])
    before = snapshot(model)
    sd = lora_tensors(model)
    sd["blocks.9.attn.qkv_x.lora_A"] = torch.zeros(4, 64)
    sd["blocks.9.attn.qkv_x.lora_B"] = torch.zeros(192, 4)
    sd["blocks.0.attn.proj_x.lora_A"] = torch.zeros(4, 32)
    with pytest.raises(CheckpointError) as err:
        apply_lora(model, lora_from_state_dict(sd, name="other.safetensors"))
    msg = str(err.value)
    assert "other.safetensors" in msg and "blocks.9.attn.qkv_x" in msg
    assert "blocks.0.attn.proj_x lora (64, 32) != model (64, 64)" in msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_malformed_lora_files(tmp_path):
    with pytest.raises(CheckpointError, match="unpaired"):
        lora_from_state_dict({"blocks.0.attn.qkv_x.lora_A": torch.zeros(2, 4)})
    with pytest.raises(CheckpointError, match="PEFT"):
        lora_from_state_dict({"transformer.a.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(CheckpointError, match=r"expected \(r, in\)"):
        lora_from_state_dict({"m.lora_A": torch.zeros(2, 4), "m.lora_B": torch.zeros(4, 3)})
    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x04.")
    with pytest.raises(CheckpointError, match="lora.ckpt"):
        load_lora(tmp_path / "lora.ckpt")
