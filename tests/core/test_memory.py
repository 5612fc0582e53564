"""Fits before it runs (issue 5 item 7): memory estimates from shapes, checked against measured
CPU peaks, and the sampler and decoder refusing what cannot fit, with options that do fit."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from mochi_core import memory, sampling, vae_tiling
from mochi_core.dit import AsymmDiT, DiTConfig
from mochi_core.estimates import LiveBytes
from mochi_core.text import TextConditioning
from mochi_core.vae import Decoder, DecoderConfig
from tests.conftest import ROOT
from tests.core.test_vae_tiling import EXACT
from tests.oracles_vae import relative_error

FULL = DiTConfig()
TINY = DiTConfig(depth=2, hidden_size_x=64, hidden_size_y=32, num_heads=2, mlp_hidden_x=128,
                 mlp_hidden_y=64, t5_feat_dim=32)
TINY_DECODER = DecoderConfig(channels=(32, 32, 64, 64), num_res_blocks=(1, 1, 1, 1, 1))


@pytest.fixture
def limit(monkeypatch):
    """Set ``MOCHI_MEMORY_LIMIT_GB`` to a number of bytes."""
    def set_limit(n_bytes: int) -> None:
        monkeypatch.setenv(memory.LIMIT_ENV, repr(n_bytes / memory.GIB))
    return set_limit


# The measured side: peak RSS of a fresh process over its RSS before the call, with every
# allocation of 1 MiB or more served by its own mmap (so freed tensors leave the RSS at once).
MEASURE = textwrap.dedent("""
    import ctypes, gc, json, resource, sys, torch
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    from mochi_core import vae_tiling
    from mochi_core.dit import AsymmDiT, DiTConfig
    from mochi_core.vae import Decoder, DecoderConfig
    case = json.loads(sys.argv[1])
    torch.manual_seed(0)
    if case["kind"] == "decode":
        model = Decoder(DecoderConfig())
        z = torch.randn(case["shape"])
        run = lambda: vae_tiling.decode(model, z, frames_per_chunk=case["chunk"],
                                        check_memory=False)
    else:
        model = AsymmDiT(DiTConfig(depth=1), dtype=torch.float32)
        B, _, T, h, w = case["shape"]
        x, y = torch.randn(case["shape"]), torch.randn(B, 256, 4096)
        mask = torch.zeros(B, 256, dtype=torch.bool)
        mask[:, :case["tokens"]] = True
        run = lambda: model(x, torch.full((B,), 0.5), y, mask)
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark
    base = rss()
    with torch.no_grad():
        run()
    with open("/proc/self/status") as f:
        hwm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM")][0]
    print(json.dumps({"peak": hwm - base}))
""")


def measured_peak(case: dict) -> int:
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(case)], cwd=ROOT,  # noqa: S603
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.parametrize("case", [
    {"kind": "decode", "shape": [1, 12, 3, 8, 8], "chunk": None},
    {"kind": "decode", "shape": [1, 12, 3, 8, 8], "chunk": 1},
    {"kind": "dit", "shape": [2, 12, 3, 30, 52], "tokens": 40},
], ids=["decode-whole", "decode-chunks-of-1", "dit-full-width-batch-2"])
def test_estimate_with_margin_covers_the_measured_cpu_peak(case):
    """Full channel widths (the real decoder; one full-width DiT block), fp32 on this CPU: the
    estimate with its margin is at least the measured peak and not wildly above it."""
    if case["kind"] == "decode":
        estimate = memory.DecodeJob(DecoderConfig(), tuple(case["shape"]), torch.float32,
                                    case["chunk"]).need()
    else:
        B, _, T, h, w = case["shape"]
        estimate = memory._dit_activations(dataclasses.replace(FULL, depth=1), (T, h, w),
                                           case["tokens"], B, torch.float32, torch.float32)
    peak = measured_peak(case)
    print(f"{case}: measured {peak / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB, "
          f"with margin {memory.with_margin(estimate) / 2**20:.0f} MiB")
    assert peak <= memory.with_margin(estimate), (peak, estimate)
    assert estimate >= 0.6 * peak, (peak, estimate)


def test_the_dit_trace_does_not_depend_on_depth():
    """Blocks free their intermediates, so one block gives the activation peak of 48."""
    one = memory._dit_activations(dataclasses.replace(FULL, depth=1), (4, 30, 52), 64, 1,
                                  torch.bfloat16, torch.bfloat16)
    three = memory._dit_activations(dataclasses.replace(FULL, depth=3), (4, 30, 52), 64, 1,
                                    torch.bfloat16, torch.bfloat16)
    assert abs(one - three) <= 0.01 * one


def test_the_need_grows_with_the_job_and_shrinks_with_the_options():
    job = memory.DiTJob(FULL, (1, 12, 28, 60, 106), 256, True, torch.bfloat16, torch.bfloat16)
    separate = dataclasses.replace(job, batch_cfg=False)
    tiled = dataclasses.replace(separate, tiling=memory._dit_tiling(384))
    longer = dataclasses.replace(job, latent_shape=(1, 12, 61, 60, 106))
    assert tiled.need() < separate.need() < job.need() < longer.need()
    # the activations of one full-size forward at 848×480×163 (cf. bench/estimates.py)
    assert 3.5 * memory.GIB < separate.need() < 5.5 * memory.GIB


def test_full_size_job_over_the_limit_is_refused_with_options_that_fit(limit):
    job = memory.DiTJob(FULL, (1, 12, 28, 60, 106), 256, True, torch.bfloat16, torch.bfloat16)
    limit(4 * memory.GIB)
    with pytest.raises(memory.InsufficientMemoryError) as refused:
        memory.check_dit(job, "cpu", weights_on_device=20 * memory.GIB)
    message = str(refused.value)
    for words in ("44,520 video tokens", "batch 2", "only 4.0 GiB is free",
                  "MOCHI_MEMORY_LIMIT_GB", "DiT tiling with", "smaller width"):
        assert words in message, message
    # a limit caps the job's own memory: freeing weights would not help, so it is not offered
    assert "fp8" not in message and "offload" not in message, message
    # the tiling offered does fit
    px = int(message.split("DiT tiling with ")[1].split(" px")[0])
    fits = dataclasses.replace(job, tiling=memory._dit_tiling(px),
                               batch_cfg="separate" not in message.split("DiT tiling")[1][:60])
    assert memory.with_margin(fits.need()) <= 4 * memory.GIB


def test_weights_options_are_offered_when_the_device_is_full():
    job = memory.DiTJob(FULL, (1, 12, 28, 60, 106), 256, False, torch.bfloat16, torch.bfloat16)
    need = memory.with_margin(job.need())
    options = memory.dit_alternatives(job, need - memory.GIB, 20 * memory.GIB,
                                      torch.device("cuda"))
    text = " | ".join(options)
    assert "fp8 weights" in text and "frees about 10.0 GiB" in text, text
    assert "offloading the DiT's blocks" in text, text
    fp8 = dataclasses.replace(job, storage_dtype=torch.float8_e4m3fn)
    assert "fp8" not in " ".join(memory.dit_alternatives(fp8, need - memory.GIB, 0,
                                                          torch.device("cpu")))


def conditioning(tokens: int, dim: int) -> TextConditioning:
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, :tokens] = True
    return TextConditioning(torch.randn(1, 8, dim), mask)


def test_sample_refuses_before_any_step(limit):
    model = AsymmDiT(TINY, dtype=torch.float32)
    steps = []
    limit(memory.MARGIN_BYTES // 2)  # below the margin alone: nothing fits
    with pytest.raises(memory.InsufficientMemoryError, match="this sampling job needs about"):
        sampling.sample(model, latents_or_shape=(1, 12, 2, 8, 8), positive=conditioning(3, 32),
                        negative=conditioning(0, 32), sigmas=[1.0, 0.5, 0.0], cfg=4.0,
                        generator=torch.Generator().manual_seed(0),
                        callback=lambda *a: steps.append(a))  # fmt: skip
    assert steps == []
    z = sampling.sample(model, latents_or_shape=(1, 12, 2, 8, 8), positive=conditioning(3, 32),
                        negative=conditioning(0, 32), sigmas=[1.0, 0.5, 0.0], cfg=4.0,
                        generator=torch.Generator().manual_seed(0), check_memory=False)
    assert torch.isfinite(z).all()


def test_decode_takes_smaller_chunks_when_the_whole_clip_does_not_fit(limit, caplog):
    """Frame chunks are exact, so the decoder picks the largest that fits; same pixels (to
    float rounding: the convolutions see other frame counts)."""
    torch.manual_seed(0)
    decoder = Decoder(TINY_DECODER).eval()
    z = torch.randn(1, 12, 6, 24, 24)
    whole = memory.DecodeJob(TINY_DECODER, tuple(z.shape), torch.float32)
    two = dataclasses.replace(whole, frames_per_chunk=2)
    assert memory.with_margin(two.need()) < memory.with_margin(whole.need())
    expected = vae_tiling.decode(decoder, z, check_memory=False)
    limit((memory.with_margin(two.need()) + memory.with_margin(whole.need())) // 2)
    with caplog.at_level(logging.WARNING, logger="mochi_core.memory"):
        got = vae_tiling.decode(decoder, z)
    assert "latent frames per chunk instead of all" in caplog.text
    assert relative_error(got, expected) <= EXACT


def test_decode_refuses_naming_a_tile_size_that_fits(limit):
    z_shape = (1, 12, 4, 64, 64)
    smallest = memory.DecodeJob(DecoderConfig(), z_shape, torch.bfloat16, 1)
    limit(memory.with_margin(smallest.need()) // 2)
    decoder = Decoder(DecoderConfig(), device="meta", dtype=torch.bfloat16)
    with pytest.raises(memory.InsufficientMemoryError) as refused:
        vae_tiling.decode(decoder, torch.empty(z_shape, device="meta", dtype=torch.bfloat16))
    message = str(refused.value)
    assert "19 frames of 512×512" in message and "even one latent frame at a time" in message
    px = int(message.split("tile_size ")[1].split(" ")[0])
    tiled = memory.fitting_decode(dataclasses.replace(smallest, tile=px // 8, overlap=8),
                                  memory.with_margin(smallest.need()) // 2)
    assert tiled is not None and px < 512


def test_bad_limit_and_bad_latents_are_named(monkeypatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match="MOCHI_MEMORY_LIMIT_GB must be a positive number"):
        memory.memory_limit()
    monkeypatch.setenv(memory.LIMIT_ENV, "-2")
    with pytest.raises(ValueError, match="got '-2'"):
        memory.memory_limit()
    with pytest.raises(ValueError, match=r"B × 12 × T × h × w .* got shape \(1, 4, 64, 64\)"):
        memory.DecodeJob(DecoderConfig(), (1, 4, 64, 64), torch.float32)


def test_free_memory_of_this_machine_is_known_and_plausible(monkeypatch):
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    free, limited = memory.free_bytes("cpu")
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    assert not limited and 0 < free <= total


def test_streamed_decode_memory_is_flat_in_clip_length():
    """The live tensors of a whole streamed decode (the real widths, traced on meta) peak at the
    same level for 43 and 163 frames: only the first chunk differs (it gives 6n − 5 frames), so
    a clip of fewer than two full chunks peaks lower, and nothing grows with length after that.
    This is also why :class:`~mochi_core.memory.DecodeJob` traces only two chunks."""
    decoder = Decoder(DecoderConfig(), device="meta")

    def streamed_peak(t: int) -> int:
        tracker = LiveBytes()
        with tracker, torch.no_grad():
            for _, pixels in vae_tiling.stream_decode(
                    decoder, torch.empty(1, 12, t, 8, 8, device="meta"), 3):
                del pixels
        return tracker.peak

    short, long = streamed_peak(8), streamed_peak(28)
    assert abs(long - short) <= 0.01 * short, (short, long)
    two_chunks = memory._decoder_peak(DecoderConfig(), (1, 28, 8, 8), 3, torch.float32)
    assert abs(two_chunks - long) <= 0.01 * long, (two_chunks, long)


# 848 × 480 at full size: 28 latent frames (163 video frames) of 60 × 106 latents
FULL_848 = (1, 12, 28, 60, 106)


def test_full_size_decode_conv_sizes_are_traced_at_the_real_widths():
    """The finest decoder level feeds a conv 128 × (6n + 2) × 482 × 850 elements for n frames."""
    for n in (1, 6, 7):
        job = memory.DecodeJob(DecoderConfig(), FULL_848, torch.bfloat16, n)
        assert job.largest_conv() == 128 * (6 * n + 2) * 482 * 850
    assert memory.DecodeJob(DecoderConfig(), FULL_848, torch.bfloat16, 7).largest_conv() \
        > memory.INDEX_LIMIT


@pytest.mark.parametrize("frames_per_chunk", [None, 8, 6, 2])
def test_gpu_decode_chunk_keeps_every_conv_under_2_31_elements(monkeypatch, frames_per_chunk):
    """On a 141 GB card, the whole clip or the largest chunk that fits (8) would pass 2^31."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: (141 * memory.GIB, True))
    job = memory.DecodeJob(DecoderConfig(), FULL_848, torch.bfloat16, frames_per_chunk)
    chosen = memory.check_decode(job, "cuda")
    assert chosen.largest_conv() <= memory.INDEX_LIMIT
    assert chosen.frames_per_chunk == min(frames_per_chunk or 6, 6)  # the most that stays under
    assert chosen.tile is None
    # the CPU kernels index with 64 bits: the whole clip (85 GiB) fits and is kept
    assert memory.check_decode(job, "cpu").frames_per_chunk == (frames_per_chunk or 28)


def test_index_limit_falls_back_to_tiles_when_one_frame_is_too_many(monkeypatch):
    # no supported size needs it at 2^31 (one frame at 848 × 480 is 0.42e9 elements), so the
    # limit is lowered below one frame to check that the largest tile under it is taken
    job = memory.DecodeJob(DecoderConfig(), (1, 12, 4, 60, 106), torch.bfloat16, None)
    one = dataclasses.replace(job, frames_per_chunk=1).largest_conv()
    monkeypatch.setattr(memory, "INDEX_LIMIT", one - 1)
    safe = memory.index_safe_decode(job)
    assert safe.tile == 512 // 8 and safe.overlap == 8 and safe.largest_conv() <= one - 1
    monkeypatch.setattr(memory, "INDEX_LIMIT", 1000)
    with pytest.raises(memory.InsufficientMemoryError, match="2\\^31"):
        memory.index_safe_decode(job)
