"""Attention backends on a GPU and off it (issue 12, items 2, 4, 6): unmasked SDPA per sample,
the device and compute capability gate of flash/sage, flash's dense kernel without a mask."""

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mochi_core import attention as attn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ragged_inputs(dtype: torch.dtype = torch.float32):
    """A CFG-like batch of 2: 48 visual tokens, then 40 and 0 text tokens (joint length 88)."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 3, 88, 16, generator=gen).to(dtype) for _ in range(3))
    valid = torch.arange(88)[None] < torch.tensor([[88], [48]])
    return q, k, v, valid


def test_per_sample_sdpa_is_the_masked_math_on_the_cpu():
    q, k, v, valid = ragged_inputs()
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    sliced = attn.sdpa_per_sample(q, k, v, valid)
    rows = valid[:, None, :, None].expand_as(q)
    # measured: 0.0 on this CPU (the same kernel over the same keys); fp32 noise at most
    assert rel_err(sliced[rows], masked[rows]) <= 1e-7
    assert torch.equal(sliced[1, :, 48:], torch.zeros(3, 40, 16))
    # a mask that is not a prefix is gathered: the same values as the masked call
    holes = valid.clone()
    holes[0, 10:20] = False
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=holes[:, None, None, :])
    rows = holes[:, None, :, None].expand_as(q)
    assert rel_err(attn.sdpa_per_sample(q, k, v, holes)[rows], masked[rows]) <= 1e-6


def test_sdpa_off_the_cpu_never_hands_the_kernel_a_mask(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask, tuple(q.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    *qkv, valid = ragged_inputs()
    q, k, v = (t.to("meta") for t in qkv)  # a non-CPU device; the mask is read on the CPU
    out = attn.sdpa_attention(q, k, v, valid)
    assert out.shape == q.shape
    assert calls == [(None, (1, 3, 88, 16)), (None, (1, 3, 48, 16))]
    calls.clear()
    attn.sdpa_attention(*ragged_inputs())  # the CPU keeps its one masked call
    assert len(calls) == 1 and calls[0][0] is not None


def _refuse(*args, **kwargs):
    raise AssertionError("a kernel ran on tensors it cannot run on")


@pytest.fixture
def refusing_kernels(monkeypatch):
    """flash_attn and sageattention stand-ins that fail when called, on a 'CUDA' machine."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_varlen_func=_refuse, flash_attn_func=_refuse))  # fmt: skip
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=_refuse))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    attn._warn_fallback.cache_clear()
    yield
    attn._warn_fallback.cache_clear()


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_cpu_tensors_never_go_to_the_kernels(refusing_kernels, caplog, name):
    backend = attn.get_attention(name)
    assert backend.name == name  # the package is there and CUDA exists: chosen at build time
    q, k, v, valid = ragged_inputs()
    with caplog.at_level(logging.WARNING, logger="mochi_core.attention"):
        for _ in range(3):
            out = attn.attend(backend, q, k, v, valid)
    ref = attn.sdpa_per_sample(q, k, v, valid)
    assert torch.equal(out, ref)
    warnings = [r for r in caplog.records if "cannot run here" in r.getMessage()]
    assert len(warnings) == 1 and "'cpu'" in warnings[0].getMessage()


def test_compute_capability_decides_on_a_cuda_device(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    for name in ("flash", "sage"):
        assert "8.0 or newer" in attn.device_reason(name, cuda)
        assert "7.5" in attn.device_reason(name, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert attn.device_reason("flash", cuda) is None
    assert attn.device_reason("sage", cuda) is None
    assert "'cpu'" in attn.device_reason("flash", torch.device("cpu"))


def test_flash_without_a_mask_calls_the_dense_kernel(monkeypatch):
    seen = []

    def dense(q, k, v):  # B × S × heads × D, as flash_attn_func takes it
        seen.append((tuple(q.shape), q.dtype))
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))
                                              ).transpose(1, 2)  # fmt: skip

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_varlen_func=_refuse, flash_attn_func=dense))  # fmt: skip
    q, k, v, _ = ragged_inputs(torch.bfloat16)
    out = attn._flash_varlen(q, k, v, None)
    assert seen == [((2, 88, 3, 16), torch.bfloat16)]
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
