"""Shared helpers of the benchmark scripts: peak memory, timing, matmul rate, environment.

Peak memory method: the kernel's per-process resident high-water mark (``VmHWM`` in
``/proc/self/status``), reset before each measured call by writing ``5`` to
``/proc/self/clear_refs`` (Linux ≥ 4.0). It counts every byte the process touches (torch's CPU
allocator returns large blocks to the OS on free, so it tracks live tensors), with no sampling
gaps. "Peak over baseline" is that high-water mark minus the RSS just before the call, i.e. the
activation memory of the call on top of the weights and inputs that were already resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M)[1])


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's resident high-water mark of this process to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Resident high-water mark since the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc), so the RSS counts only live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def return_freed_memory_at_once(threshold: int = 1 << 20) -> None:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mmap.

    Freed tensors then go back to the OS at once, so the RSS high-water mark measures the
    live memory of a call rather than what the C heap (and the per-thread arenas of the OpenMP
    workers) kept from earlier calls. It costs page faults on every large allocation, so the
    scripts that time compute-bound work do not use it.
    """
    m_mmap_threshold = -3  # from <malloc.h>; setting it also stops the dynamic adjustment
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, threshold)


@dataclass
class Measured:
    """One call: wall seconds, process CPU seconds per torch thread, peak RSS over the RSS
    before the call, and the call's result."""

    wall: float
    cpu: float
    peak: int
    result: object


def measure(fn: Callable[[], object]) -> Measured:
    """Run ``fn`` once and measure it (see :class:`Measured`).

    The CPU time per thread (process CPU seconds / torch threads) is printed beside the wall
    time because the machine is shared: when other tenants load it, the wall time grows with
    their load while our CPU time does not (much).
    """
    gc.collect()
    trim_heap()
    reset_peak_rss()
    base = rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Measured(wall, cpu / torch.get_num_threads(), peak_rss_bytes() - base, result)


def matmul_flops_per_s(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> tuple[float, float]:
    """FLOP/s of an ``n³`` matmul in ``dtype`` on the CPU (one warm-up call first): the medians
    over ``reps`` calls by wall time and by CPU time per thread."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    calls = [measure(lambda: torch.mm(a, b)) for _ in range(reps)]
    flops = 2 * n**3
    return (flops / statistics.median(c.wall for c in calls),
            flops / statistics.median(c.cpu for c in calls))  # fmt: skip


@contextlib.contextmanager
def counting_scaled_mm():
    """Counts the ``torch._scaled_mm`` calls (fp8 matmuls) made in the block; they still run.
    Yields a one-element list holding the count."""
    calls, real = [0], torch._scaled_mm

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    torch._scaled_mm = counting
    try:
        yield calls
    finally:
        torch._scaled_mm = real


def environment() -> str:
    """One line naming the date, machine, torch version, threads and load."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now} | {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads | load average {load}")  # fmt: skip


def fmt_bytes(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"
