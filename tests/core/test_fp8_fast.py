"""The fp8 fast mode (issue 12, item 5): fp8 Linear layers that multiply in fp8 with scaled
activations (``mochi_core.ops.fp8_fast``), measured on this CPU, whose torch runs
``torch._scaled_mm``; where it cannot run, the layer casts as fp8 storage does."""

from __future__ import annotations

import logging

import pytest
import torch

from mochi_core import checkpoints, ops
from mochi_core.__main__ import _dit_option_errors as dit_option_errors
from mochi_core.__main__ import build_parser
from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.pipeline import WEIGHT_DTYPES, DiTOptions
from tests.oracles import random_dit_state_dict

E4M3 = torch.float8_e4m3fn
#: Every width a multiple of 16, as in the full-size model (3072, 1536, 8192, 4096, 4096).
SMALL = DiTConfig(depth=4, hidden_size_x=192, hidden_size_y=128, num_heads=4, mlp_hidden_x=512,
                  mlp_hidden_y=352, t5_feat_dim=128)  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Each test sees the device decided and the fallback reasons logged anew."""
    ops._warn_cast.cache_clear()
    ops.fp8_compute_problem.cache_clear()
    yield
    ops._warn_cast.cache_clear()
    ops.fp8_compute_problem.cache_clear()


def fp8_linear(cls=ops.FastFp8Linear, in_features=64, out_features=48, dtype=E4M3, seed=0):
    """A layer holding a scaled fp8 weight (``q * scale``), its scale and a bias."""
    g = torch.Generator().manual_seed(seed)
    layer = cls(in_features, out_features, device="meta")
    weight, scale = checkpoints.quantize_fp8(
        torch.randn(out_features, in_features, generator=g) * 0.05, dtype)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=g), requires_grad=False)
    layer.scale_weight = scale
    return layer


def test_the_fast_linear_is_the_product_of_its_quantized_operands(scaled_mm_calls):
    """Out = (q_x s_x)(q_w s_w)^T + bias with fp32 accumulation: against that product in fp64
    the error is fp32 noise for an fp32 output and one bf16 rounding for a bf16 one."""
    layer = fp8_linear()
    g = torch.Generator().manual_seed(1)
    # measured 1.2e-7 and 1.6e-3
    for dtype, bound in ((torch.float32, 5e-7), (torch.bfloat16, 2**-8)):
        x = (torch.randn(2, 7, 64, generator=g) * 3).to(dtype)
        with torch.no_grad():
            out = layer(x)
        q, scale = ops.quantize_per_tensor(x.reshape(-1, 64))
        weight = layer.weight.double() * layer.scale_weight.double()
        want = (q.double() * scale.double()) @ weight.t() + layer.bias.to(dtype).double()
        assert out.dtype == dtype and out.shape == (2, 7, 48)
        assert rel_err(out, want.reshape(2, 7, 48)) <= bound, dtype
    assert scaled_mm_calls == [(14, 64), (14, 64)]


def test_activations_are_scaled_not_clipped():
    """The largest magnitude maps to the format's largest value, so nothing is clipped (the
    host's fast mode clamps unscaled inputs at ±448) and small inputs keep their mantissa."""
    limit = torch.finfo(E4M3).max
    for magnitude in (3e4, 1.0, 1e-5):
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)) * magnitude
        q, scale = ops.quantize_per_tensor(x)
        assert q.dtype == E4M3 and float(q.float().abs().max()) == limit
        # e4m3 keeps 3 mantissa bits: relative rounding at most 2^-4 for normal values
        assert rel_err(q.float() * scale, x) <= 2**-4, magnitude
    q, scale = ops.quantize_per_tensor(torch.zeros(4, 16))
    assert torch.equal(q.float(), torch.zeros(4, 16)) and torch.isfinite(scale)
    # a bf16 input is divided by a bf16 scale: the scale returned (which the matmul applies)
    # must be that one, not the fp32 value it was rounded from (a bias of up to 2^-9)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)).bfloat16() * 7
    q, scale = ops.quantize_per_tensor(x)
    assert torch.equal(scale.bfloat16().float(), scale)
    assert torch.equal(q, (x / scale.bfloat16()).to(E4M3))


def small_model(dtype: torch.dtype, operations) -> AsymmDiT:
    """SMALL with seed-0 random weights under the storage policy of ``dtype`` (bf16 or fp8:
    both compute in bf16)."""
    sd = random_dit_state_dict(SMALL, torch.Generator().manual_seed(0), torch.float32)
    return checkpoints.dit_from_state_dict(sd, dtype=dtype, operations=operations)


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 3, 16, 24, generator=g)
    y = torch.randn(2, 24, SMALL.t5_feat_dim, generator=g)
    mask = torch.arange(24)[None] < torch.tensor([[24], [10]])
    return x, torch.rand(2, generator=g), y, mask


def test_a_dit_in_fast_mode_multiplies_every_fp8_layer_in_fp8(scaled_mm_calls, caplog):
    """Every fp8 block layer runs ``_scaled_mm`` (the bf16 embedders and final layer cast, as
    in every mode), and the velocity stays within fp8's rounding of the bf16 model's."""
    inputs = dit_inputs()
    with torch.no_grad():
        bf16 = small_model(torch.bfloat16, ops.cast)(*inputs)
        storage = small_model(E4M3, ops.cast)(*inputs)
        assert scaled_mm_calls == []
        fast_model = small_model(E4M3, ops.fp8_fast)
        with caplog.at_level(logging.WARNING, logger="mochi_core.ops"):
            fast = fast_model(*inputs)
    fp8_layers = [m for m in fast_model.modules()
                  if isinstance(m, ops.FastFp8Linear) and m.weight.dtype == E4M3]
    assert len(fp8_layers) == 37 and len(scaled_mm_calls) == len(fp8_layers)
    assert not caplog.records, "no layer may fall back here"
    # fp8 storage rounds the weights (measured 3.9e-2 against bf16); fast mode rounds the
    # activations too (measured 5.2e-2: about sqrt(2) times, two independent roundings)
    assert rel_err(storage, bf16) <= 0.045
    assert rel_err(fast, bf16) <= 0.06
    assert rel_err(fast, storage) <= 0.04  # measured 3.4e-2


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: fp8_linear(dtype=torch.float8_e5m2), "float8_e5m2"),
    (lambda: fp8_linear(in_features=40), "not a multiple of 16"),
])  # fmt: skip
def test_a_layer_the_kernel_cannot_take_casts_and_says_why_once(make, reason, scaled_mm_calls,
                                                                 caplog):  # fmt: skip
    layer = make()
    plain = ops.Linear(layer.in_features, layer.out_features, device="meta")
    plain.weight, plain.bias, plain.scale_weight = layer.weight, layer.bias, layer.scale_weight
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING, logger="mochi_core.ops"), torch.no_grad():
        outs = [layer(x) for _ in range(3)]
        want = plain(x)
    assert all(torch.equal(out, want) for out in outs)
    assert scaled_mm_calls == []
    assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()


def test_a_device_without_fp8_matmuls_casts(monkeypatch, scaled_mm_calls, caplog):
    """A GPU older than Ada has no fp8 tensor cores; a device where ``_scaled_mm`` fails is
    found by a probe: both cast, each with its reason."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "8.9 or newer" in ops.fp8_compute_problem(cuda)
    ops.fp8_compute_problem.cache_clear()  # another GPU on the same index
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ops.fp8_compute_problem(cuda) is None
    assert ops.fp8_compute_problem(torch.device("cpu")) is None  # this torch runs it on the CPU
    assert scaled_mm_calls == [(16, 16)]  # the probe itself, once
    scaled_mm_calls.clear()
    ops.fp8_compute_problem.cache_clear()
    monkeypatch.setattr(ops, "_probe", lambda device_type: "no fp8 kernel on 'cpu' (test)")
    layer = fp8_linear()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.WARNING, logger="mochi_core.ops"), torch.no_grad():
        out = layer(x)
        want = ops.Linear.forward(layer, x)
    assert torch.equal(out, want) and scaled_mm_calls == []
    assert "no fp8 kernel" in caplog.records[0].getMessage()


def test_the_fast_choice_is_one_rule_for_the_cli_and_the_pipeline():
    fast = WEIGHT_DTYPES["fp8_e4m3fn_fast"]
    assert fast.dtype == E4M3 and fast.fp8_fast and not WEIGHT_DTYPES["fp8_e4m3fn"].fp8_fast
    args = build_parser().parse_args(["--demo", "--weight-dtype", "fp8_e4m3fn_fast"])
    assert dit_option_errors(args) == []
    assert args.dit_options.dtype == E4M3 and args.dit_options.fp8_fast
    assert "fp8_fast" in DiTOptions(dtype=torch.bfloat16, fp8_fast=True).problems()
    assert DiTOptions(dtype=None, fp8_fast=True).problems() == {}  # the file's fp8


def test_the_pipeline_loads_fast_layers_and_they_run(tmp_path, scaled_mm_calls):
    from mochi_core.demo import make_demo_checkpoints  # noqa: PLC0415
    from mochi_core.pipeline import CheckpointPaths, _prepared_dit  # noqa: PLC0415

    demo = make_demo_checkpoints(tmp_path, seed=0)
    paths = CheckpointPaths(demo.dit, demo.vae, demo.t5)
    options = DiTOptions(dtype=E4M3, fp8_fast=True)
    model = _prepared_dit(paths, options, torch.device("cpu"))
    layer = model.blocks[0].attn.qkv_x
    assert type(layer) is ops.FastFp8Linear and layer.weight.dtype == E4M3
    c = model.config
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, c.in_channels, 2, 4, 6, generator=g)
    y = torch.randn(1, 5, c.t5_feat_dim, generator=g)
    with torch.no_grad():
        out = model(x, torch.tensor([0.7]), y, torch.tensor([[True] * 3 + [False] * 2]))
    assert torch.isfinite(out).all() and scaled_mm_calls
