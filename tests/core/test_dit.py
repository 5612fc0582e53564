"""AsymmDiT behaviour on tiny random-weight configs (CPU), and the attention backends."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from mochi_core import attention as attn
from mochi_core import dit as dit_module
from mochi_core.dit import (
    AsymmDiT,
    DiTConfig,
    rope_positions,
    rope_rotation,
    text_lengths,
    timestep_embedding,
)
from tests.conftest import KEYS_DIR
from tests.oracles import random_dit_state_dict

TINY = DiTConfig(
    depth=3, hidden_size_x=96, hidden_size_y=64, num_heads=2, mlp_hidden_x=256,
    mlp_hidden_y=160, t5_feat_dim=64,
)  # fmt: skip
L_TEXT = 24


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_model(dtype: torch.dtype = torch.float32, **kwargs) -> AsymmDiT:
    """The tiny model holding seed-0 random weights stored in ``dtype``."""
    sd = random_dit_state_dict(TINY, torch.Generator().manual_seed(0), dtype)
    model = AsymmDiT(TINY, dtype=dtype, **kwargs)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def inputs(lengths: list[int], seed: int = 1):
    """x (B, 12, 2, 8, 12), sigma (B,), T5 features (B, 24, 64) and right-padded masks."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    x = torch.randn(B, 12, 2, 8, 12, generator=gen)
    sigma = torch.rand(B, generator=gen)
    y_feat = torch.randn(B, L_TEXT, TINY.t5_feat_dim, generator=gen)
    y_mask = torch.arange(L_TEXT)[None, :] < torch.tensor(lengths)[:, None]
    return x, sigma, y_feat, y_mask


@pytest.fixture(scope="module")
def model() -> AsymmDiT:
    return make_model()


def run(model: AsymmDiT, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)


# ------------------------------------------------------------------------------------ config


def manifest_state_dict() -> dict[str, torch.Tensor]:
    """The full-size Genmo key manifest as meta tensors."""
    sd = {}
    for line in (KEYS_DIR / "genmo_dit_keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        sd[key] = torch.empty(eval(shape), device="meta")  # noqa: S307 (a shape literal)
    return sd


def test_config_from_full_size_manifest():
    assert DiTConfig.from_state_dict(manifest_state_dict()) == DiTConfig.mochi_preview()


def test_config_from_tiny_state_dict():
    sd = random_dit_state_dict(TINY, torch.Generator().manual_seed(0))
    assert DiTConfig.from_state_dict(sd) == TINY


def test_config_names_missing_keys():
    sd = random_dit_state_dict(TINY, torch.Generator().manual_seed(0))
    del sd["t5_yproj.weight"]
    with pytest.raises(ValueError, match="t5_yproj.weight"):
        DiTConfig.from_state_dict(sd)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in manifest_state_dict().items()}
    with pytest.raises(ValueError, match="not a Genmo-keyed"):
        DiTConfig.from_state_dict(prefixed)


def test_full_size_module_names_and_shapes_equal_the_manifest():
    model = AsymmDiT(DiTConfig.mochi_preview(), device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in manifest_state_dict().items()}
    assert sum(v.numel() for v in model.state_dict().values()) == 10_027_677_744
    assert isinstance(model.blocks[-1].attn.proj_y, torch.nn.Identity)
    assert not hasattr(model.blocks[-1], "mlp_y")


def test_strict_load_of_random_genmo_state_dict():
    sd = random_dit_state_dict(TINY, torch.Generator().manual_seed(0))
    result = AsymmDiT(TINY).load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


# ------------------------------------------------------------------------------------ forward


def test_tiny_forward(model):
    x, sigma, y_feat, y_mask = inputs([7])
    out = run(model, x, sigma, y_feat, y_mask)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert 0.1 < out.std().item() < 10.0  # O(1), not saturated or vanishing
    assert rel_err(run(model, x, sigma * 0.5, y_feat, y_mask), out) > 1e-3  # uses sigma
    y_mask2 = inputs([8])[3]
    assert rel_err(run(model, x, sigma, y_feat, y_mask2), out) > 1e-4  # uses the 8th token


@pytest.mark.parametrize("lengths", [[7], [7, 15]])
def test_garbage_in_padded_rows_changes_nothing(model, lengths):
    x, sigma, y_feat, y_mask = inputs(lengths)
    clean = run(model, x, sigma, y_feat, y_mask)
    garbage = torch.where(y_mask[..., None], y_feat, 1e4 * torch.randn_like(y_feat))
    assert torch.equal(run(model, x, sigma, garbage, y_mask), clean)
    garbage[~y_mask] = float("nan")
    assert torch.equal(run(model, x, sigma, garbage, y_mask), clean)


@pytest.mark.parametrize("lengths", [[7, 15], [0, 11], [5, 5]])
def test_batch_equals_single_calls(model, lengths):
    x, sigma, y_feat, y_mask = inputs(lengths)
    batched = run(model, x, sigma, y_feat, y_mask)
    for b in range(len(lengths)):
        single = run(model, *(t[b : b + 1] for t in (x, sigma, y_feat, y_mask)))
        assert rel_err(batched[b : b + 1], single) <= 1e-5


def test_batch_with_backend_without_masks_loops_per_sample(model):
    """A callable without ``ragged_batch`` never sees a mask and gives the same result."""
    seen: list[tuple[int, ...]] = []

    def maskless(q, k, v, valid):
        assert valid is None
        seen.append(tuple(q.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    x, sigma, y_feat, y_mask = inputs([7, 15])
    looped = make_model(attention=maskless)
    out = run(looped, x, sigma, y_feat, y_mask)
    assert rel_err(out, run(model, x, sigma, y_feat, y_mask)) <= 1e-5
    n_visual = 2 * 4 * 6
    assert seen[:2] == [(1, 2, n_visual + 7, 48), (1, 2, n_visual + 15, 48)]


def test_empty_mask_gives_zero_text_tokens(model):
    x, sigma, y_feat, y_mask = inputs([0])
    out = run(model, x, sigma, y_feat, y_mask)
    assert torch.isfinite(out).all()
    other = torch.randn_like(y_feat)  # the features of an empty prompt play no part
    assert torch.equal(run(model, x, sigma, other, y_mask), out)
    assert rel_err(run(model, x, sigma, y_feat, inputs([1])[3]), out) > 1e-3


def test_mask_must_be_right_padded(model):
    x, sigma, y_feat, y_mask = inputs([7])
    y_mask[0, 3] = False
    with pytest.raises(ValueError, match="right-padded"):
        run(model, x, sigma, y_feat, y_mask)
    assert text_lengths(inputs([7, 0])[3]).tolist() == [7, 0]


def test_latent_size_must_divide_by_patch(model):
    x, sigma, y_feat, y_mask = inputs([7])
    with pytest.raises(AssertionError, match="divisible"):
        run(model, x[..., :7], sigma, y_feat, y_mask)


# ------------------------------------------------------------------------------------ precision


def test_timestep_embedding_is_cos_then_sin_of_one_minus_sigma():
    emb = timestep_embedding(torch.tensor([0.0, 250.0]), 256)
    assert emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    expected = torch.cat([torch.cos(250 * freqs), torch.sin(250 * freqs)])
    assert torch.allclose(emb[1].double(), expected, atol=1e-4)


def test_rope_stays_fp32_with_bf16_weights():
    model = make_model(torch.bfloat16)
    assert model.t5_yproj.weight.dtype == torch.bfloat16
    assert model.pos_frequencies.dtype == torch.float32
    assert model.blocks[0].attn.q_norm_x.weight.dtype == torch.float32
    assert model.resolved_compute_dtype() == torch.bfloat16
    pos = rope_positions(2, 4, 6)
    rot = rope_rotation(model.pos_frequencies, pos)
    assert rot.dtype == torch.float32 and rot.shape == (48, TINY.num_heads, TINY.head_dim // 2, 2)
    exact = torch.einsum("na,ahf->nhf", pos.double(), model.pos_frequencies.double())
    angle = torch.atan2(rot[..., 1], rot[..., 0]).double()
    assert torch.allclose(angle, torch.atan2(exact.sin(), exact.cos()), atol=1e-4)
    assert torch.allclose(rot.double().norm(dim=-1), torch.ones(()).double(), atol=1e-6)


def test_bf16_storage_is_close_to_fp32(model):
    x, sigma, y_feat, y_mask = inputs([7, 15])
    ref = run(model, x, sigma, y_feat, y_mask)
    out = run(make_model(torch.bfloat16), x, sigma, y_feat, y_mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2  # bf16 has an 8-bit mantissa (2⁻⁸ ≈ 4e-3 per rounding)


def test_fp8_storage_computes_in_bf16(model):
    """fp8 block weights (the rest fp32 or fp8) compute in bf16; RoPE and QK norms stay fp32."""
    fp8 = torch.float8_e4m3fn
    sd = random_dit_state_dict(TINY, torch.Generator().manual_seed(0))
    sd = {k: v.to(fp8) if k.startswith("blocks.") or k == "pos_frequencies" else v
          for k, v in sd.items()}  # fmt: skip
    quant = AsymmDiT(TINY, device="meta", dtype=fp8)
    quant.load_state_dict(sd, strict=True, assign=True)
    assert quant.blocks[0].attn.qkv_x.weight.dtype == fp8
    assert quant.t5_yproj.weight.dtype == torch.float32
    assert quant.pos_frequencies.dtype == torch.float32
    assert quant.blocks[1].attn.k_norm_y.weight.dtype == torch.float32
    assert quant.resolved_compute_dtype() == torch.bfloat16
    forced = AsymmDiT(TINY, device="meta", dtype=fp8, compute_dtype=torch.float32)
    assert forced.resolved_compute_dtype() == torch.float32
    x, sigma, y_feat, y_mask = inputs([7])
    out = run(quant, x, sigma, y_feat, y_mask)
    assert torch.isfinite(out).all()
    assert rel_err(out, run(model, x, sigma, y_feat, y_mask)) < 0.15  # e4m3: 2⁻⁴ per rounding


# ------------------------------------------------------------------------------------ RoPE


def test_rope_positions_at_848x480():
    pos = rope_positions(3, 30, 53)  # 480×848 pixels → 60×106 latents → 30×53 patches
    assert pos.shape == (3 * 30 * 53, 3) and pos.dtype == torch.float32
    scale = math.sqrt(36864 / (30 * 53))
    assert scale == pytest.approx(4.8151, abs=1e-4)
    assert pos[:, 0].unique().tolist() == [0.0, 1.0, 2.0]
    assert pos[:, 2].max().item() == pytest.approx(125.19, abs=5e-3)
    assert pos[:, 1].min().item() == pytest.approx(-69.82, abs=5e-3)
    # row-major (t, h, w): the second token moves along w only
    assert pos[1, 2] - pos[0, 2] == pytest.approx(scale) and pos[1, 1] == pos[0, 1]


def test_rope_positions_of_a_tile_are_its_canvas_positions():
    canvas = rope_positions(4, 10, 16).view(4, 10, 16, 3)
    tile = rope_positions(2, 4, 6, canvas_hw=(10, 16), offset_thw=(1, 3, 8))
    assert torch.allclose(tile.view(2, 4, 6, 3), canvas[1:3, 3:7, 8:14], atol=1e-5)
    with pytest.raises(ValueError, match="outside the canvas"):
        rope_positions(1, 4, 6, canvas_hw=(10, 16), offset_thw=(0, 8, 0))


def test_forward_takes_precomputed_rope_positions(model):
    x, sigma, y_feat, y_mask = inputs([7])
    out = run(model, x, sigma, y_feat, y_mask)
    own = rope_positions(2, 4, 6)
    assert torch.equal(run(model, x, sigma, y_feat, y_mask, rope_pos=own), out)
    shifted = rope_positions(2, 4, 6, canvas_hw=(8, 12), offset_thw=(0, 2, 3))
    assert rel_err(run(model, x, sigma, y_feat, y_mask, rope_pos=shifted), out) > 1e-3


# ------------------------------------------------------------------------------------ attention


def test_unknown_attention_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="sdpa, flash, sage"):
        attn.get_attention("xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        AsymmDiT(TINY, device="meta", attention="flash2")


@pytest.mark.parametrize(("name", "package"), [("flash", "flash_attn"), ("sage", "sageattention")])
def test_missing_backend_falls_back_to_sdpa_with_a_warning(caplog, name, package):
    if name in attn.available_backends():
        assert attn.get_attention(name).name == name
        return
    with caplog.at_level(logging.WARNING, logger="mochi_core.attention"):
        backend = attn.get_attention(name)
    assert backend.name == "sdpa"
    assert package in caplog.text and "falling back" in caplog.text


def test_backends_record_ragged_batch_support():
    assert "sdpa" in attn.available_backends()
    assert attn.get_attention("sdpa").ragged_batch
    assert attn._FLASH.ragged_batch and not attn._SAGE.ragged_batch


def test_sdpa_mask_never_attends_invalid_keys():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=gen) for _ in range(3))
    valid = torch.arange(10)[None] < torch.tensor([[6], [10]])
    out = attn.sdpa_attention(q, k, v, valid)
    v_garbage = torch.where(valid[:, None, :, None], v, 1e6)
    assert torch.equal(attn.sdpa_attention(q, k, v_garbage, valid)[:, :, :6], out[:, :, :6])
    cropped = attn.sdpa_attention(q[:1, :, :6], k[:1, :, :6], v[:1, :, :6], None)
    assert rel_err(out[:1, :, :6], cropped) <= 1e-6
    looped = attn.attend(lambda q, k, v, m: attn.sdpa_attention(q, k, v, m), q, k, v, valid)
    assert rel_err(looped[:, :, :6], out[:, :, :6]) <= 1e-6
    assert torch.equal(looped[0, :, 6:], torch.zeros(3, 4, 8))


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash_attn_varlen_func stand-in: SDPA on each packed (total, heads, D) segment."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
    assert q.dtype in (torch.float16, torch.bfloat16)
    lengths = cu_q.diff()
    assert int(lengths.max()) == max_q
    pieces = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, heads, len, D)
        pieces.append(attn.sdpa_attention(*seg, None)[0].transpose(0, 1))
    return torch.cat(pieces)


def _fake_sage(q, k, v, tensor_layout, is_causal):
    """sageattn stand-in (HND layout, no mask)."""
    assert tensor_layout == "HND" and not is_causal and q.dtype == torch.bfloat16
    return attn.sdpa_attention(q, k, v, None)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Installs stand-ins for flash_attn and sageattention, pretends a CUDA device exists and
    that these CPU tensors are on one the kernels run on; returns the names of the kernels called
    (so a test knows the stand-in ran, not the sdpa fallback)."""
    import sys
    import types

    calls = []

    def recorded(name, kernel):
        def call(*args, **kwargs):
            calls.append(name)
            return kernel(*args, **kwargs)
        return call

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_varlen_func=recorded("flash_varlen", _fake_varlen)))  # fmt: skip
    monkeypatch.setitem(sys.modules, "sageattention",
                        types.SimpleNamespace(sageattn=recorded("sage", _fake_sage)))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attn, "device_reason", lambda name, device: None)
    return calls


def test_flash_varlen_packs_valid_tokens(fake_kernels):
    assert attn.available_backends() == ["sdpa", "flash", "sage"]
    backend = attn.get_attention("flash")
    assert backend.name == "flash" and backend.ragged_batch
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 9, 8, generator=gen).bfloat16() for _ in range(3))
    valid = torch.arange(9)[None] < torch.tensor([[9], [4], [6]])
    out = backend(q, k, v, valid)
    ref = attn.sdpa_attention(q, k, v, valid)
    # rows of valid tokens agree (bf16 rounding); rows of padded tokens are zero
    assert rel_err(out.transpose(1, 2)[valid], ref.transpose(1, 2)[valid]) < 1e-2
    assert torch.equal(out[1, :, 4:], torch.zeros_like(out[1, :, 4:]))
    assert fake_kernels == ["flash_varlen"]


def test_sage_model_loops_over_a_ragged_batch(fake_kernels, model):
    sage = make_model(attention="sage")
    assert sage.attention.name == "sage" and not sage.attention.ragged_batch
    x, sigma, y_feat, y_mask = inputs([7, 15])
    out = run(sage, x, sigma, y_feat, y_mask)  # _fake_sage asserts it never sees a mask
    assert rel_err(out, run(model, x, sigma, y_feat, y_mask)) < 2e-2  # attention in bf16
    assert fake_kernels and set(fake_kernels) == {"sage"}


# ------------------------------------------------------------------------------ MLP chunking


def test_token_chunks_cover_every_token_once_in_bounded_slices():
    for n, size in [(48, 4096), (44520, 4096), (10, 3), (7, 7), (1, 4)]:
        chunks = dit_module.token_chunks(n, size)
        covered = [i for s in chunks for i in range(n)[s]]
        assert covered == list(range(n)), (n, size)
        assert max(s.stop - s.start for s in chunks) <= size


def test_mlp_chunking_does_not_change_the_output(model, monkeypatch):
    args = inputs([5, 9])  # 2 × 2 × 4 × 6 = 48 visual tokens per sample
    whole = run(model, *args)
    monkeypatch.setattr(dit_module, "MLP_CHUNK", 7)  # 7 uneven chunks per sample
    chunked = run(model, *args)
    assert rel_err(chunked, whole) <= 1e-6
