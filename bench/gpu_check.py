"""The prepared GPU check (issue 12): one run on one H100/H200, random weights at full size.

Sections, in order of value; each runs in its own try/except, is skipped with a printed reason
when a feature is missing or the time budget is spent, and is written to the JSON as soon as it
ends (so a run killed at its limit still returns what it did):

``dit_sdpa``          seconds per step (CFG 4.5, 40-token prompt vs Genmo's empty negative) at
                      848×480×49 and ×163, batched and separate CFG, which SDPA op ran (profiler),
                      peak memory against ``sampling.memory_job(...).need()``
``attention``         the same step with the flash and sage backends, where they can run
``vae_decode``        streamed decode of 163 frames: time, peak against ``memory.DecodeJob``, the
                      chunk the memory check chose, equality to a chunk-1 decode, the 2^31 guard
                      (largest conv input traced on meta; an unguarded chunk of 8 on the GPU)
``memory``            the peaks of both sections above against their estimates, side by side
``fp8``               fp8 storage (cast per layer) and fp8 fast (``mochi_core.ops.fp8_fast``, its
                      ``_scaled_mm`` calls counted): time per step, error against bf16
``peers``             the same forward in diffusers' ``MochiTransformer3DModel`` and the host's
                      ``comfy.ldm.genmo`` model: time ratio and relative difference to ours
``offload``           ``offload_blocks`` with prefetch at resident 4 and 8 against fully resident
``host_partial_load`` ComfyUI's ``ModelPatcher.load`` with a weight budget below the DiT's size
                      (via ``nodes/managed.py``): placed bytes, time per step, equality
``compile``           ``compile_blocks`` (inductor) in a child process with a hard timeout: compile
                      time, unique graphs, seconds per step compiled against eager

``--tiny`` runs every section on the CPU at tiny sizes in seconds (compile with the ``eager``
backend, dynamo only); a CI test runs it so the script never rots.

The one device call (``bench/gpu_check.sh`` prepares the wheels here and holds the command)::

    bash bench/gpu_check.sh prepare          # here, once: diffusers wheels → bench/results/wheels
    run(command="bash bench/gpu_check.sh device", carry=[".host/ComfyUI", "bench/results/wheels"],
        timeout_s=480)

The script's own budget is 420 s (``--budget``), the call's limit 480 s, so a second try of the
failed sections (``--sections ...``) still fits in 15 minutes of device time. Results land in
``$OUT/gpu_check.json`` and ``$OUT/gpu_check.log``; the table is printed last.

    .venv/bin/python bench/gpu_check.py --tiny --out /tmp/gpu_check.json   # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._util import (  # noqa: E402
    counting_scaled_mm,
    environment,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from mochi_core import attention, memory, ops, sampling, vae_tiling  # noqa: E402
from mochi_core.dit import AsymmDiT, DiTConfig  # noqa: E402
from mochi_core.estimates import analytic_forward_flops  # noqa: E402
from mochi_core.text import TextConditioning  # noqa: E402
from mochi_core.vae import Decoder, DecoderConfig  # noqa: E402

SECTIONS = ("dit_sdpa", "attention", "vae_decode", "memory", "fp8", "peers", "offload",
            "host_partial_load", "compile")  # fmt: skip
#: Seconds a section needs at full size at least; it is skipped when less of the budget is left.
NEEDS = {"dit_sdpa": 30, "attention": 20, "vae_decode": 40, "memory": 0, "fp8": 20,
         "peers": 40, "offload": 40, "host_partial_load": 30, "compile": 60}  # fmt: skip
TINY_DIT = DiTConfig(depth=4, hidden_size_x=96, hidden_size_y=96, num_heads=2, mlp_hidden_x=256,
                     mlp_hidden_y=256, t5_feat_dim=64)  # fmt: skip
TINY_DECODER = DecoderConfig(channels=(32, 32, 64, 64), num_res_blocks=(1, 1, 1, 1, 1))
L_TEXT, N_REAL, SIGMA, CFG = 256, 40, 0.7, 4.5
GIB = 1024**3
INT32_MAX = 2**31 - 1

log = logging.getLogger("gpu_check")


class Skip(Exception):
    """A section (or part of one) that cannot run here; the message is the reason."""


# --------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB (the tiny mode's sizes)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double().to(a.device)
    return ((a - b).norm() / b.norm()).item()


def measured(fn: Callable[[], object], device: torch.device) -> tuple[float, int, object]:
    """``(seconds, peak bytes over the bytes before the call, result)``: CUDA's allocator peak
    (``max_memory_allocated``) on a GPU, the resident high-water mark on the CPU."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = rss_bytes()
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    top = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return seconds, top - base, out


def repeat(ck: Check, fn: Callable[[], object], reps: int, limit: float) -> dict:
    """Time ``fn`` up to ``reps`` times (at least once, stopping after ``limit`` seconds or at
    the deadline); the first call is timed too and listed (it may include warm-up)."""
    times, peaks, out = [], [], None
    start = time.perf_counter()
    while len(times) < reps:
        seconds, peak, out = measured(fn, ck.device)
        times.append(seconds)
        peaks.append(peak)
        if time.perf_counter() - start > limit or ck.remaining() < 0:
            break
    best = times[1:] or times
    return {"s": statistics.median(best), "times_s": [round(t, 4) for t in times],
            "peak_bytes": max(peaks), "out": out}  # fmt: skip


def attention_ops(fn: Callable[[], object], device: torch.device) -> dict[str, int]:
    """The SDPA/attention aten ops (and softmax, the math path) one call of ``fn`` ran, with
    their call counts, read from torch's profiler; on CUDA also the attention kernels."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wanted = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "fmha",
              "softmax", "sage")  # fmt: skip
    return {e.key[:120]: e.count for e in prof.key_averages()
            if any(w in e.key.lower() for w in wanted)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Random weights, made where they live (10B values on the GPU take milliseconds)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter in place so activations stay O(1): fan-in scaled weights, norm
    weights near 1, small biases, RoPE frequencies of a few radians over the canvas."""
    gen = None
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for name, p in mod.named_parameters(recurse=False):
                if gen is None or gen.device != p.device:
                    gen = torch.Generator(p.device).manual_seed(seed)
                full = f"{mod_name}.{name}"
                if full.startswith("rope."):
                    p.normal_(0.0, 0.05, generator=gen)
                elif name == "bias":
                    p.normal_(0.0, 0.02, generator=gen)
                elif p.dim() == 1:  # norm weights (Group/Layer/RMS)
                    p.normal_(1.0, 0.1, generator=gen)
                else:
                    p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=gen)


def build_dit(ck: Check, dtype: torch.dtype = torch.bfloat16) -> AsymmDiT:
    model = AsymmDiT(ck.config, device="meta", dtype=dtype)
    model.to_empty(device=ck.device)
    randomize_(model, seed=0)
    return model.eval()


def dit_copy(model: AsymmDiT, convert: Callable[[torch.Tensor], torch.Tensor],
             operations=ops.cast) -> AsymmDiT:  # fmt: skip
    """A second DiT holding ``convert(t)`` of ``model``'s tensors (shared where unchanged)."""
    sd = {k: convert(v) for k, v in model.state_dict().items()}
    other = AsymmDiT(model.config, operations=operations, device="meta",
                     compute_dtype=torch.bfloat16)  # fmt: skip
    other.load_state_dict(sd, strict=True, assign=True)
    return other.eval()


def to_fp8(t: torch.Tensor) -> torch.Tensor:
    """Weights of two or more dims to float8_e4m3fn, as the fp8 checkpoints store them."""
    return t.to(torch.float8_e4m3fn) if t.dim() >= 2 and t.dtype == torch.bfloat16 else t


# --------------------------------------------------------------------------------------------
# The run


class Check:
    """Options, the shared model and inputs, the deadline and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.tiny = args, args.tiny
        cuda = torch.cuda.is_available() and not args.tiny
        self.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
        self.config = TINY_DIT if self.tiny else DiTConfig.mochi_preview()
        self.latent_hw = (8, 8) if self.tiny else (60, 106)  # 128×128 / 848×480 pixels
        self.frames = tuple(args.frames or ((7, 13) if self.tiny else (49, 163)))
        self.reps = args.reps or (1 if self.tiny else 3)
        self.start = time.perf_counter()
        self.deadline = self.start + (args.budget or (600 if self.tiny else 420))
        self.results: dict = {"meta": {}, "sections": {}}
        self._model: AsymmDiT | None = None
        self._refs: dict[int, torch.Tensor] = {}
        self.host_module = None

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def need(self, section: str) -> float:
        return 0.0 if self.tiny else NEEDS[section]

    @property
    def model(self) -> AsymmDiT:
        if self._model is None:
            self._model = build_dit(self)
        return self._model

    def drop_model(self) -> None:
        self._model = None
        self._refs.clear()
        free(self.device)

    def latent_shape(self, frames: int) -> tuple[int, int, int, int, int]:
        return (1, 12, (frames - 1) // 6 + 1, *self.latent_hw)

    def z(self, frames: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(frames)
        return torch.randn(self.latent_shape(frames), generator=gen).to(self.device)

    def prompts(self) -> tuple[TextConditioning, TextConditioning]:
        """A 40-token prompt and Genmo's empty negative (zeroed, no real token)."""
        gen = torch.Generator().manual_seed(1)
        feats = torch.randn(1, L_TEXT, self.config.t5_feat_dim, generator=gen)
        mask = torch.arange(L_TEXT)[None] < N_REAL
        pos = TextConditioning(feats * mask[..., None], mask)
        neg = TextConditioning(torch.zeros_like(feats), torch.zeros_like(mask))
        return pos.to(self.device), neg.to(self.device)

    def step(self, model, frames: int, batch_cfg: bool) -> Callable[[], torch.Tensor]:
        """One guided sampler step at ``frames`` (the sampler's own ``guided_velocity``)."""
        z, (pos, neg) = self.z(frames), self.prompts()

        def run() -> torch.Tensor:
            with torch.no_grad():
                return sampling.guided_velocity(model, z, SIGMA, pos, neg, CFG, batch_cfg)

        return run

    def forward(self, model, frames: int) -> Callable[[], torch.Tensor]:
        """One conditional forward (B = 1) at ``frames``."""
        z, (pos, _) = self.z(frames), self.prompts()
        sigma = torch.full((1,), SIGMA, device=self.device)

        def run() -> torch.Tensor:
            with torch.no_grad():
                return model(z, sigma, pos.features, pos.mask)

        return run

    def reference(self, frames: int) -> torch.Tensor:
        """Our bf16 resident forward at ``frames`` (computed once)."""
        if frames not in self._refs:
            self._refs[frames] = self.forward(self.model, frames)()
        return self._refs[frames]

    def tokens(self, frames: int) -> int:
        _, _, T, h, w = self.latent_shape(frames)
        return T * (h // 2) * (w // 2)

    def step_flops(self, frames: int) -> int:
        """FLOPs of one guided step (two passes; the negative has no text)."""
        n = self.tokens(frames)
        return (analytic_forward_flops(self.config, n, N_REAL)
                + analytic_forward_flops(self.config, n, 0))  # fmt: skip


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Sections: each returns {"figures": {...}, "skipped": {part: reason}, "rows": [table lines]}


def sec_dit_sdpa(ck: Check) -> dict:
    model, figures, rows = ck.model, {}, []
    for frames in ck.frames:
        for batched in (True, False):
            key = f"{frames}f_{'batched' if batched else 'separate'}"
            if ck.remaining() < 5 and figures:
                raise Skip(f"time budget spent before {key}")
            step = ck.step(model, frames, batched)
            if frames == ck.frames[0]:
                step()  # warm-up: kernels, cuBLAS handles
            r = repeat(ck, step, ck.reps if frames == ck.frames[0] else 2, limit=30)
            job = sampling.memory_job(model, ck.latent_shape(frames), *ck.prompts(), CFG, 1,
                                      batched, None)  # fmt: skip
            need = job.need()
            fig = {"s_per_step": r["s"], "times_s": r["times_s"], "peak_bytes": r["peak_bytes"],
                   "estimate_bytes": need, "estimate_with_margin_bytes": memory.with_margin(need),
                   "tokens": ck.tokens(frames),
                   "tflops": ck.step_flops(frames) / r["s"] / 1e12}  # fmt: skip
            if frames == ck.frames[0]:
                fig["attention_ops"] = attention_ops(step, ck.device)
            figures[key] = fig
            rows.append(f"{key}: {r['s']:.3f} s/step, {fig['tflops']:.0f} TFLOP/s, peak "
                        f"{fmt(r['peak_bytes'])} (estimate {fmt(need)})")
            del r
    first = ck.frames[0]
    ran = {mode: sorted(figures.get(f"{first}f_{mode}", {}).get("attention_ops", {}))
           for mode in ("batched", "separate")}
    rows.append(f"SDPA ops ({first}f): " + "; ".join(f"{k}: {', '.join(v) or '?'}"
                                                     for k, v in ran.items()))
    figures["supports_batched_text"] = sampling.supports_batched_text(model)
    return {"figures": figures, "rows": rows}


def sec_attention(ck: Check) -> dict:
    figures, skipped, rows = {}, {}, []
    frames = ck.frames[0]
    for name in ("flash", "sage"):
        reason = attention._unavailable_reason(name) if hasattr(
            attention, "_unavailable_reason") else None
        if reason is None and name not in attention.available_backends():
            reason = "not in attention.available_backends()"
        if reason is None and ck.device.type != "cuda":
            reason = "needs a CUDA device"
        if reason is not None:
            skipped[name] = reason
            continue
        model = ck.model
        saved = model.attention
        try:
            model.attention = attention.get_attention(name)
            step = ck.step(model, frames, batch_cfg=sampling.supports_batched_text(model))
            step()
            r = repeat(ck, step, ck.reps, limit=20)
            err = rel_err(ck.forward(model, frames)(), ck.reference(frames))
        finally:
            model.attention = saved
        figures[name] = {"s_per_step": r["s"], "times_s": r["times_s"], "rel_err_vs_sdpa": err}
        rows.append(f"{name} {frames}f: {r['s']:.3f} s/step, rel diff vs sdpa {err:.2e}")
    if not figures:
        raise Skip("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return {"figures": figures, "skipped": skipped, "rows": rows}


class ConvInputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest element count of any convolution input (meta tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.largest = max(self.largest, args[0].numel(), args[1].numel())
        return func(*args, **(kwargs or {}))


def largest_conv_input(config: DecoderConfig, shape: tuple, chunk: int) -> int:
    """Largest conv input of decoding the first two ``chunk``-frame chunks of ``shape``, on meta."""
    decoder = Decoder(config, device="meta")
    B, C, T, h, w = shape
    z = torch.empty(B, C, min(T, 2 * chunk), h, w, device="meta")
    mode = ConvInputs()
    with mode, torch.no_grad():
        for _ in vae_tiling.stream_decode(decoder, z, chunk):
            pass
    return mode.largest


def build_decoder(ck: Check, dtype: torch.dtype) -> Decoder:
    decoder = Decoder(TINY_DECODER if ck.tiny else DecoderConfig(), device="meta", dtype=dtype)
    decoder.to_empty(device=ck.device)
    randomize_(decoder, seed=2)
    return decoder.eval()


class Warnings(logging.Handler):
    """Collects the warnings of the mochi_core loggers during a section."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:400])


def sec_vae_decode(ck: Check) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ck.args.vae_dtype]
    decoder = build_decoder(ck, dtype)
    frames = ck.frames[-1]
    shape = ck.latent_shape(frames)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(ck.device, dtype)
    job = memory.check_decode(memory.DecodeJob(decoder.config, shape, dtype, None), ck.device)
    chunk = job.frames_per_chunk or shape[2]
    largest = largest_conv_input(decoder.config, shape, chunk)
    seconds, peak, pixels = measured(lambda: vae_tiling.decode(decoder, z), ck.device)
    figures = {"frames": frames, "dtype": ck.args.vae_dtype, "chunk_chosen": chunk,
               "s": seconds, "peak_bytes": peak, "estimate_bytes": job.need(),
               "estimate_with_margin_bytes": memory.with_margin(job.need()),
               "largest_conv_input_elements": largest,
               "largest_conv_input_below_2^31": largest <= INT32_MAX}  # fmt: skip
    ref_s, ref_peak, ref = measured(lambda: vae_tiling.decode(decoder, z, frames_per_chunk=1),
                                    ck.device)  # fmt: skip
    figures |= {"chunk1_s": ref_s, "chunk1_peak_bytes": ref_peak,
                "equal_to_chunk1": torch.equal(pixels, ref),
                "max_abs_diff_to_chunk1": (pixels - ref).abs().max().item()}  # fmt: skip
    del pixels
    rows = [f"{frames}f {ck.args.vae_dtype}: chunk {chunk} {seconds:.1f} s, peak "
            f"{fmt(peak)} (estimate {fmt(job.need())}); chunk 1 {ref_s:.1f} s; "
            f"equal {figures['equal_to_chunk1']} (max |Δ| {figures['max_abs_diff_to_chunk1']:.1e})"
            f"; largest conv input {largest:,} ({'<' if largest <= INT32_MAX else '>'} 2^31)"]
    skipped = {}
    if ck.device.type == "cuda" and not ck.tiny:
        figures["guard"] = guard_probe(ck, decoder, z, ref)
        rows.append(f"2^31 guard: {figures['guard']}")
    else:
        skipped["guard_probe"] = ("a chunk of 8 frames passes 2^31 elements only at full "
                                  "size on a GPU")
    return {"figures": figures, "skipped": skipped, "rows": rows}


def guard_probe(ck: Check, decoder: Decoder, z: torch.Tensor, ref: torch.Tensor) -> dict:
    """A chunk of 8 latent frames (a 128 × 50 × 482 × 850 conv input): raw, then through
    ``decode`` without the memory check (the guard should retry or refuse it cleanly)."""
    out: dict = {"chunk": 8, "predicted_elements": largest_conv_input(decoder.config,
                                                                       tuple(z.shape), 8)}
    try:
        seconds, peak, pixels = measured(
            lambda: next(vae_tiling.stream_decode(decoder, z, 8))[1], ck.device)
        out["raw"] = f"ran in {seconds:.1f} s, peak {peak / GIB:.1f} GiB"
        del pixels
    except (RuntimeError, torch.OutOfMemoryError) as error:
        out["raw"] = f"{type(error).__name__}: {str(error)[:300]}"
    free(ck.device)
    handler = Warnings()
    logging.getLogger("mochi_core").addHandler(handler)
    try:
        seconds, _, pixels = measured(lambda: vae_tiling.decode(
            decoder, z, frames_per_chunk=8, check_memory=False), ck.device)
        out["decode"] = f"ok in {seconds:.1f} s, equal to chunk 1: {torch.equal(pixels, ref)}"
    except (RuntimeError, torch.OutOfMemoryError) as error:
        out["decode"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        logging.getLogger("mochi_core").removeHandler(handler)
    out["warnings"] = handler.messages[:5]
    free(ck.device)
    return out


def sec_memory(ck: Check) -> dict:
    rows, figures = [], {}
    sections = ck.results["sections"]
    for name in ("dit_sdpa", "vae_decode"):
        figs = sections.get(name, {}).get("figures", {})
        items = figs.items() if name == "dit_sdpa" else [("decode", figs)]
        for key, fig in items:
            if not isinstance(fig, dict) or "estimate_bytes" not in fig:
                continue
            peak, est = fig["peak_bytes"], fig["estimate_bytes"]
            figures[f"{name}.{key}"] = {"peak_bytes": peak, "estimate_bytes": est,
                                        "with_margin_bytes": fig["estimate_with_margin_bytes"],
                                        "peak_over_estimate": peak / est if est else None}
            rows.append(f"{name}.{key}: measured {fmt(peak)}, estimate {fmt(est)}"
                        f" (with margin {fmt(fig['estimate_with_margin_bytes'])}), "
                        f"ratio {peak / est:.2f}")
    if not figures:
        raise Skip("no measured step or decode to compare (dit_sdpa and vae_decode did not run)")
    return {"figures": figures, "rows": rows}


def sec_fp8(ck: Check) -> dict:
    frames, figures, skipped, rows = ck.frames[0], {}, {}, []
    ref = ck.reference(frames)
    variants = [("storage", ops.cast), ("fast", ops.fp8_fast)]
    if (problem := ops.fp8_compute_problem(ck.device)) is not None:
        skipped["fast_matmul"] = f"fast mode casts here: {problem}"
    for label, operations in variants:
        try:
            model8 = dit_copy(ck.model, to_fp8, operations)
            step = ck.step(model8, frames, sampling.supports_batched_text(model8))
            with counting_scaled_mm() as counted:
                step()
            calls = counted[0]
            r = repeat(ck, step, ck.reps, limit=20)
            err = rel_err(ck.forward(model8, frames)(), ref)
        except Exception as error:  # noqa: BLE001 - one variant failing keeps the other
            skipped[label] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            continue
        finally:
            model8 = None
            free(ck.device)
        figures[label] = {"s_per_step": r["s"], "times_s": r["times_s"], "rel_err_vs_bf16": err,
                          "scaled_mm_calls_per_step": calls}  # fmt: skip
        rows.append(f"fp8 {label} {frames}f: {r['s']:.3f} s/step, rel err vs bf16 {err:.2e}, "
                    f"{calls} _scaled_mm calls")
    if not figures:
        raise Skip("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return {"figures": figures, "skipped": skipped, "rows": rows}


def host(ck: Check):
    """The ComfyUI snapshot (``.host/ComfyUI`` or ``$MOCHI_HOST_DIR``) in this device's mode,
    and the pack's ``nodes/managed.py``; records which torch flags its import changed."""
    if ck.host_module is not None:
        return ck.host_module
    host_dir = Path(os.environ.get("MOCHI_HOST_DIR", ROOT / ".host" / "ComfyUI"))
    if not (host_dir / "comfy").is_dir():
        raise Skip(f"no ComfyUI snapshot at {host_dir} (carry .host/ComfyUI)")
    sys.path.insert(0, str(host_dir))
    from comfy.cli_args import args  # noqa: PLC0415

    args.cpu = ck.device.type == "cpu"
    before = torch_flags()
    spec = importlib.util.spec_from_file_location("managed", ROOT / "nodes" / "managed.py")
    managed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(managed)
    after = torch_flags()
    ck.results["meta"]["host_changed_flags"] = {k: [before[k], after[k]] for k in before
                                                if before[k] != after[k]}  # fmt: skip
    ck.host_module = managed
    return managed


def torch_flags() -> dict[str, object]:
    """Global torch settings a host import may change (they change timings after it)."""
    cuda = torch.backends.cuda
    return {"matmul_precision": torch.get_float32_matmul_precision(),
            "matmul_tf32": cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "bf16_reduced": cuda.matmul.allow_bf16_reduced_precision_reduction,
            "flash_sdp": cuda.flash_sdp_enabled(),
            "mem_efficient_sdp": cuda.mem_efficient_sdp_enabled(),
            "math_sdp": cuda.math_sdp_enabled()}  # fmt: skip


def peer_builders(ck: Check) -> tuple[dict, dict]:
    """``{name: (build, forward)}`` of the peers that can run here, and skip reasons."""
    from tests import oracles  # noqa: PLC0415

    builders, skipped = {}, {}
    if importlib.util.find_spec("diffusers") is None:
        skipped["diffusers"] = "diffusers is not installed (carry its wheel)"
    else:
        builders["diffusers"] = (lambda sd: oracles.diffusers_dit(ck.config, sd),
                                 oracles.diffusers_velocity)  # fmt: skip
    try:
        host(ck)
        builders["host"] = (lambda sd: oracles.comfy_dit(ck.config, sd), oracles.comfy_velocity)
    except Skip as why:
        skipped["host"] = str(why)
    return builders, skipped


def sec_peers(ck: Check) -> dict:
    builders, skipped = peer_builders(ck)
    if not builders:
        raise Skip("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    figures, rows = {}, []
    sd = ck.model.state_dict()
    pos, _ = ck.prompts()
    for name, (build, velocity) in builders.items():
        try:
            peer = build(sd)
        except Exception as error:  # noqa: BLE001 - a peer that cannot be built is skipped
            skipped[name] = f"failed to build: {type(error).__name__}: {str(error)[:300]}"
            continue
        for frames in ck.frames[:1] if ck.tiny else ck.frames:
            z = ck.z(frames).to(torch.bfloat16)
            sigma = torch.full((1,), SIGMA, device=ck.device)
            ours = repeat(ck, ck.forward(ck.model, frames), 2, limit=15)
            theirs = repeat(ck, lambda peer=peer, z=z, s=sigma, velocity=velocity: velocity(
                peer, z, s, pos.features.to(torch.bfloat16), pos.mask), 2, limit=15)
            err = rel_err(theirs["out"].float(), ours["out"])
            figures[f"{name}_{frames}f"] = {
                "ours_s": ours["s"], "peer_s": theirs["s"],
                "ours_over_peer": ours["s"] / theirs["s"],
                "rel_diff": err, "ours_peak_bytes": ours["peak_bytes"],
                "peer_peak_bytes": theirs["peak_bytes"]}  # fmt: skip
            rows.append(f"{name} {frames}f: ours {ours['s']:.3f} s, {name} {theirs['s']:.3f} s "
                        f"(×{ours['s'] / theirs['s']:.2f}), rel diff {err:.2e}")
            del ours, theirs
        peer = None
        free(ck.device)
    return {"figures": figures, "skipped": skipped, "rows": rows}


def sec_offload(ck: Check) -> dict:
    from mochi_core.offload import offload_blocks  # noqa: PLC0415

    frames, model = ck.frames[0], ck.model
    batched = sampling.supports_batched_text(model)
    resident = repeat(ck, ck.step(model, frames, batched), 2, limit=10)
    ref = ck.reference(frames)
    figures = {"resident_s": resident["s"], "batched_cfg": batched}
    rows = [f"fully resident {frames}f: {resident['s']:.3f} s/step"]
    for n in (2, 3) if ck.tiny else (4, 8):
        start = time.perf_counter()
        handle = offload_blocks(model, resident=n, device=ck.device, prefetch=True)
        setup = time.perf_counter() - start
        try:
            step = ck.step(model, frames, batched)
            step()
            r = repeat(ck, step, 2, limit=15)
            equal = torch.equal(ck.forward(model, frames)(), ref)
        finally:
            handle.remove()
        figures[f"resident_{n}"] = {"s_per_step": r["s"], "times_s": r["times_s"],
                                    "over_resident": r["s"] / resident["s"], "setup_s": setup,
                                    "peak_bytes": r["peak_bytes"], "equal_to_resident": equal,
                                    "max_resident": handle.stats.max_resident}  # fmt: skip
        rows.append(f"resident {n}: {r['s']:.3f} s/step (×{r['s'] / resident['s']:.2f} of "
                    f"resident), equal {equal}, setup {setup:.1f} s")
        handle = None
        free(ck.device)
    return {"figures": figures, "rows": rows}


def sec_host_partial_load(ck: Check) -> dict:
    managed = host(ck)
    from mochi_core.checkpoints import LayerStorage  # noqa: PLC0415

    frames = ck.frames[0]
    ref = ck.reference(frames)
    bf16 = torch.bfloat16
    cpu_sd = {k: v.to("cpu") for k, v in ck.model.state_dict().items()}
    layers = managed.dit_operations(ck.device)(LayerStorage(bf16, bf16, None))
    model = AsymmDiT(ck.config, operations=layers, device="meta", dtype=bf16)
    model.load_state_dict(cpu_sd, strict=True, assign=True)
    del cpu_sd
    place = managed.Placement(ck.device, torch.device("cpu"))
    patcher = managed.managed(model.eval(), "dit", place)
    size = patcher.model_size()
    budget = int(ck.args.host_budget_gb * 1e9) if not ck.tiny else size // 2
    start = time.perf_counter()
    patcher.load(ck.device, lowvram_model_memory=budget)
    load_s = time.perf_counter() - start
    try:
        batched = sampling.supports_batched_text(model)
        step = ck.step(model, frames, batched)
        step()
        r = repeat(ck, step, 2, limit=20)
        out = ck.forward(model, frames)()
        equal, err = torch.equal(out, ref), rel_err(out, ref)
        placed = patcher.loaded_size()
    finally:
        with contextlib.suppress(Exception):
            patcher.detach()
    figures = {"model_bytes": size, "budget_bytes": budget, "placed_bytes": placed,
               "load_s": load_s, "s_per_step": r["s"], "times_s": r["times_s"],
               "peak_bytes": r["peak_bytes"], "equal_to_resident": equal, "rel_diff": err}
    resident = ck.results["sections"].get("offload", {}).get("figures", {}).get("resident_s")
    if resident:
        figures["over_resident"] = r["s"] / resident
    rows = [f"budget {budget / 1e9:.1f} GB of {size / 1e9:.1f} GB: placed {placed / 1e9:.1f} GB, "
            f"{r['s']:.3f} s/step" + (f" (×{r['s'] / resident:.2f} of resident)" if resident
                                      else "") + f", equal {equal}, rel diff {err:.1e}"]
    patcher = model = None
    free(ck.device)
    return {"figures": figures, "rows": rows}


def sec_compile(ck: Check) -> dict:
    """Runs :func:`compile_child` in a child process with a hard timeout."""
    limit = min(ck.args.compile_timeout, ck.remaining())
    if limit < ck.need("compile"):
        raise Skip(f"{limit:.0f} s left of the time budget, compile needs {NEEDS['compile']}+")
    out = Path(ck.args.out).with_suffix(".compile.json")
    command = [sys.executable, str(Path(__file__).resolve()), "--child-compile", "--out",
               str(out), "--device", ck.device.type] + (["--tiny"] if ck.tiny else [])
    command += ["--frames", str(ck.frames[0]), "--reps", str(ck.reps)]
    ck.drop_model()  # the child builds its own; free the parent's memory for it
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)  # noqa: S603
    except subprocess.TimeoutExpired as error:
        raise Skip(f"compile did not finish within {limit:.0f} s (killed)") from error
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"compile child failed ({done.returncode}): {done.stderr[-1500:]}")
    figures = json.loads(out.read_text())
    out.unlink()
    rows = [f"{figures['backend']} {ck.frames[0]}f: compile {figures['compile_s']:.1f} s, "
            f"{figures['unique_graphs']} unique graphs, compiled {figures['compiled_s']:.3f} s/step"
            f" vs eager {figures['eager_s']:.3f} (active {figures['active']}, "
            f"reason {figures['reason']})"]
    return {"figures": figures, "rows": rows}


def compile_child(ck: Check) -> dict:
    from torch._dynamo.utils import counters  # noqa: PLC0415

    from mochi_core.compile import compile_blocks  # noqa: PLC0415

    frames, model = ck.frames[0], ck.model
    batched = sampling.supports_batched_text(model)
    step = ck.step(model, frames, batched)
    step()
    eager = repeat(ck, step, ck.reps, limit=15)
    backend = "eager" if ck.tiny else "inductor"
    handle = compile_blocks(model, backend=backend)
    first, _, _ = measured(step, ck.device)
    compiled = repeat(ck, step, ck.reps, limit=15)
    return {"backend": backend, "compile_s": first - compiled["s"], "first_call_s": first,
            "compiled_s": compiled["s"], "eager_s": eager["s"],
            "speedup": eager["s"] / compiled["s"], "active": handle.active,
            "reason": handle.reason, "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}  # fmt: skip


RUNNERS = {"dit_sdpa": sec_dit_sdpa, "attention": sec_attention, "vae_decode": sec_vae_decode,
           "memory": sec_memory, "fp8": sec_fp8, "peers": sec_peers, "offload": sec_offload,
           "host_partial_load": sec_host_partial_load, "compile": sec_compile}  # fmt: skip


def run_section(ck: Check, name: str) -> dict:
    """One section under try/except: status ok, skipped (with a reason) or error."""
    if ck.remaining() < ck.need(name):
        return {"status": "skipped", "reason": f"time budget: {ck.remaining():.0f} s left, "
                                               f"needs {ck.need(name)} s"}  # fmt: skip
    handler = Warnings()
    logging.getLogger("mochi_core").addHandler(handler)
    start = time.perf_counter()
    try:
        result = {"status": "ok", **RUNNERS[name](ck)}
    except Skip as why:
        result = {"status": "skipped", "reason": str(why)}
    except Exception as error:  # noqa: BLE001 - one section's failure must not end the run
        result = {"status": "error", "reason": f"{type(error).__name__}: {str(error)[:500]}",
                  "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
    finally:
        logging.getLogger("mochi_core").removeHandler(handler)
        free(ck.device)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["warnings"] = handler.messages[:20]
    return result


def capabilities(ck: Check) -> dict:
    caps = {"device": str(ck.device), "torch": torch.__version__, "python": sys.version.split()[0],
            "mode": "tiny" if ck.tiny else "full", "environment": environment(),
            "attention_backends": attention.available_backends(),
            "diffusers": importlib.util.find_spec("diffusers") is not None,
            "fp8_fast_matmul": ops.fp8_compute_problem(ck.device) or "yes",
            "torch_flags": torch_flags(),
            "budget_s": round(ck.remaining())}  # fmt: skip
    if ck.device.type == "cuda":
        props = torch.cuda.get_device_properties(ck.device)
        caps |= {"gpu": props.name, "capability": list(torch.cuda.get_device_capability()),
                 "gpu_memory_bytes": props.total_memory, "bf16_matmul_tflops": matmul_rate(ck)}
    return caps


def matmul_rate(ck: Check, n: int = 8192) -> float:
    """The bf16 ceiling: TFLOP/s of an n³ matmul on random data (median of 10 after 3)."""
    a, b = (torch.randn(n, n, device=ck.device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        seconds, _, _ = measured(lambda: a @ b, ck.device)
        if i >= 3:
            times.append(seconds)
    return 2 * n**3 / statistics.median(times) / 1e12


def write(ck: Check) -> None:
    Path(ck.args.out).write_text(json.dumps(ck.results, indent=1, default=str))


def table(ck: Check) -> str:
    lines = [f"gpu_check ({ck.results['meta'].get('mode')}, {ck.results['meta'].get('device')}, "
             f"{ck.results['meta'].get('gpu', 'no GPU')}): {ck.args.out}"]
    for name, sec in ck.results["sections"].items():
        head = f"{name:<18} {sec['status']:<8} {sec.get('seconds', 0):6.1f} s"
        if sec["status"] != "ok":
            lines.append(f"{head}  {sec.get('reason')}")
            continue
        rows = sec.get("rows") or ["(no figures)"]
        lines.append(f"{head}  {rows[0]}")
        lines += [f"{'':<35}  {row}" for row in rows[1:]]
        lines += [f"{'':<35}  skipped {k}: {v}" for k, v in sec.get("skipped", {}).items()]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (seconds)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--budget", type=float, default=0, help="seconds for the whole run "
                                                               "(default 420; tiny 600)")
    parser.add_argument("--frames", type=int, nargs="+", help="pixel frames (6k+1)")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions per case")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--vae-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="decoder dtype (the VAE loader's default is fp32)")
    parser.add_argument("--host-budget-gb", type=float, default=8.0,
                        help="weight budget of the host partial load (GB)")
    parser.add_argument("--compile-timeout", type=float, default=180.0)
    parser.add_argument("--child-compile", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests import netguard  # noqa: PLC0415  (no network: outbound connects fail)

    netguard.install()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    ck = Check(args)
    if args.child_compile:
        Path(args.out).write_text(json.dumps(compile_child(ck), default=str))
        return
    ck.results["meta"] = capabilities(ck)
    write(ck)
    for name in args.sections:
        ck.results["sections"][name] = run_section(ck, name)
        sec = ck.results["sections"][name]
        print(f"[{time.perf_counter() - ck.start:6.1f} s] {name}: {sec['status']} "
              f"{sec.get('reason') or ''}", flush=True)
        write(ck)
    print(table(ck), flush=True)


if __name__ == "__main__":
    main()
