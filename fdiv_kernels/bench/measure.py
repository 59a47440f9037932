"""Timing, memory and bandwidth measurement shared by every benchmark.

CPU: wall-clock medians over repeats, peak resident memory from the kernel's high-water mark
(/proc/self/status VmHWM, reset through /proc/self/clear_refs). GPU: ``triton.testing.do_bench``
medians and the caching allocator's peak.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            min_repeats: int = 5, budget_s: float = 2.0) -> float:
    """Median milliseconds of ``fn()``, synchronized inside the timed region."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def capped_ms(fn: Callable[[], object], device: torch.device, cap_s: float | None,
              budget_s: float = 2.0) -> tuple[float, bool]:
    """``time_ms(fn)``, unless one call is so slow that its warm-up and repeats would take more
    than ``cap_s`` seconds: then the median of as many calls as fit (at least one after the
    timed first call), and True, so that one slow peer cannot dominate the run. ``budget_s``:
    the repeats' time budget of ``time_ms``."""
    if cap_s is None or device.type == "cuda":
        return time_ms(fn, device, budget_s=budget_s), False
    t0 = time.perf_counter()
    fn()  # also the first warm-up call
    _sync(device)
    first = time.perf_counter() - t0
    if first * (1 + 5) <= cap_s:  # time_ms's 2 warm-ups and 5 repeats fit (one warm-up done)
        budget = min(budget_s, max(0.0, cap_s - 6 * first))
        return time_ms(fn, device, warmup=1, budget_s=budget), False
    times = []
    for _ in range(max(1, int(cap_s / first) - 1)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), True


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@functools.lru_cache(maxsize=None)
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Memory ``fn()`` needs above what was live before it (inputs excluded); None if unknown.

    On the CPU: the resident high-water mark. Freed memory the allocator still holds would be
    reused without showing up, so it is handed back to the OS first (``malloc_trim``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        base = _proc_status("VmRSS:")
        fn()
        return max(0, _proc_status("VmHWM:") - base)
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device_str: str) -> float:
    """Measured device copy bandwidth (GB/s, read + write bytes), the roofline we report against."""
    device = torch.device(device_str)
    n = (1 << 28 if device.type == "cuda" else 1 << 26) // 4  # 1 GiB on GPU, 256 MiB on CPU
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, min_repeats=10, budget_s=1.0)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"
