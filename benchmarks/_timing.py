"""Timing and peak-memory helpers shared by the kernel benchmarks, for CUDA and (rehearsal) CPU.

On CUDA: CUDA events around each run and the caching allocator's peak. On CPU (the rehearsal of
`make gpu-check`, where only the plumbing matters): wall-clock time, and no peak memory (None).
"""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, reps: int, before=None) -> float:
    """Median milliseconds of `fn()` over `reps` runs after `warmup` runs; `before()` runs untimed
    ahead of each run (e.g. to drop the last run's gradients)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if before:
            before()
        if device.type == "cuda":
            start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak allocated bytes during one `fn()` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)
