"""T5 text conditioning: the real tokenizer, state-dict layouts, and parity with ComfyUI's T5."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mochi_core.demo import DemoT5Size, random_t5_state_dict
from mochi_core.text import (
    TOKENIZER_SUBDIR,
    T5Conditioner,
    TextConditioning,
    find_tokenizer_dir,
    load_tokenizer,
    t5_config_from_state_dict,
)
from tests.conftest import HOST_DIR, import_host

SIZE = DemoT5Size(d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=48)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(HOST_DIR / TOKENIZER_SUBDIR)


@pytest.fixture(scope="module")
def sd():
    return random_t5_state_dict(3, SIZE)


@pytest.fixture(scope="module")
def conditioner(sd, tokenizer):
    return T5Conditioner.from_state_dict(sd, HOST_DIR / TOKENIZER_SUBDIR)


def host_t5(sd: dict[str, torch.Tensor]):
    """ComfyUI's own T5 implementation, as an independent oracle (fp32, CPU)."""
    import_host()
    import comfy.ops  # noqa: PLC0415
    from comfy.text_encoders.t5 import T5  # noqa: PLC0415

    config = {"num_layers": SIZE.num_layers, "d_model": SIZE.d_model, "d_kv": SIZE.d_kv,
              "num_heads": SIZE.num_heads, "d_ff": SIZE.d_ff, "vocab_size": SIZE.vocab,
              "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5"}
    model = T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_tokenizer_is_found_without_arguments():
    directory = find_tokenizer_dir()
    assert (directory / "tokenizer.json").is_file()
    assert directory.parts[-3:] == TOKENIZER_SUBDIR.parts


def test_tokenizer_is_searched_on_sys_path(tmp_path, monkeypatch):
    fake = tmp_path / TOKENIZER_SUBDIR
    fake.mkdir(parents=True)
    (fake / "tokenizer.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_tokenizer_dir() == fake


def test_missing_explicit_tokenizer_dir_fails_clearly(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*--tokenizer"):
        find_tokenizer_dir(tmp_path)


def test_tokenize_appends_eos_and_right_pads(conditioner):
    ids, mask = conditioner.tokenize(["a cat playing piano"])
    assert ids.shape == mask.shape == (1, 256) and mask.dtype == torch.bool
    assert ids[0, :6].tolist() == [3, 9, 1712, 1556, 8355, 1]  # real T5 v1.1 ids, EOS = 1
    assert mask[0].sum() == 6 and mask[0, :6].all()
    assert (ids[0, 6:] == 0).all()


def test_long_prompt_is_truncated_with_warning(conditioner, caplog):
    with caplog.at_level(logging.WARNING, logger="mochi_core.text"):
        ids, mask = conditioner.tokenize(["word " * 400])
    assert mask.all() and ids[0, -1] == 1
    assert "truncated to 256" in caplog.text


def test_config_inferred_from_shapes(sd):
    c = t5_config_from_state_dict(sd)
    assert (c.vocab_size, c.d_model, c.d_kv, c.num_heads, c.d_ff, c.num_layers) == (
        32128, 32, 8, 4, 48, 2)
    assert c.is_gated_act and c.relative_attention_num_buckets == 32


def test_features_match_comfyui_t5(conditioner, sd):
    prompts = ["a cat playing piano", "a red panda, cinematic lighting, 35mm film"]
    cond = conditioner.encode(prompts)
    assert cond.features.shape == (2, 256, 32) and cond.features.dtype == torch.float32
    ids, mask = conditioner.tokenize(prompts)
    with torch.no_grad():
        ref, _ = host_t5(sd)(ids, mask.long())
        unmasked, _ = host_t5(sd)(ids, None)
    torch.testing.assert_close(cond.features, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(cond.mask, mask)
    # the mask reaches T5: without it the padding changes the real tokens' features
    assert (unmasked[0, :6] - cond.features[0, :6]).abs().max() > 1e-3


def test_empty_prompt_zeroed_like_genmo(conditioner):
    cond = conditioner.encode(["a dog", ""])
    assert cond.mask[1].sum() == 0 and (cond.features[1] == 0).all()
    assert torch.equal(cond.mask[0], conditioner.tokenize(["a dog"])[1][0])
    only_empty = conditioner.encode("")
    assert only_empty.mask.sum() == 0 and only_empty.features.abs().sum() == 0


def test_empty_prompt_comfyui_behaviour_keeps_eos(conditioner):
    cond = conditioner.encode([""], zero_empty=False)
    assert cond.mask[0].tolist() == [True] + [False] * 255
    assert cond.features[0, 0].abs().sum() > 0


def test_fp16_and_scaled_fp8_all_in_one_layouts(sd, tokenizer):
    prefix = "text_encoders.t5xxl.transformer."
    fp8, dequantized = {f"{prefix}scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, w in sd.items():
        if w.ndim == 2 and "relative_attention_bias" not in key and key != "shared.weight":
            scale = w.abs().max() / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            fp8[prefix + key], fp8[prefix + key[:-6] + "scale_weight"] = q, scale
            dequantized[key] = q.float() * scale
        else:
            fp8[prefix + key] = dequantized[key] = w
    prompts = ["a cat playing piano"]
    from_fp8 = T5Conditioner(T5Conditioner.from_state_dict(fp8).encoder, tokenizer).encode(prompts)
    ref = T5Conditioner.from_state_dict(dequantized).encode(prompts)
    torch.testing.assert_close(from_fp8.features, ref.features, atol=1e-6, rtol=1e-6)
    half = {k: v.half() for k, v in sd.items()}
    from_half = T5Conditioner.from_state_dict(half).encode(prompts)
    assert from_half.features.dtype == torch.float32
    assert torch.isfinite(from_half.features).all()


def test_unexpected_keys_are_named(sd):
    bad = dict(sd)
    bad["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="extra"):
        T5Conditioner.from_state_dict(bad)


def test_text_conditioning_validation_and_cat():
    a = TextConditioning(torch.ones(1, 4, 8), torch.tensor([[True, True, False, False]]))
    b = TextConditioning(torch.ones(1, 6, 8), torch.tensor([[True] * 6]))
    both = TextConditioning.cat([a, b])
    assert both.features.shape == (2, 6, 8)
    assert both.mask.sum(1).tolist() == [2, 6] and (both.features[0, 4:] == 0).all()
    assert a.expand(3).features.shape == (3, 4, 8)
    with pytest.raises(ValueError, match="bool"):
        TextConditioning(torch.ones(1, 4, 8), torch.ones(1, 4))
    with pytest.raises(ValueError, match="B×L"):
        TextConditioning(torch.ones(1, 4, 8), torch.ones(1, 5, dtype=torch.bool))
