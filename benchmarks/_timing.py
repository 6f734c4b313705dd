"""CUDA-event timing shared by the GPU benchmark scripts (`python benchmarks/gpu_*.py`)."""

from __future__ import annotations

import statistics

import torch


def median_cuda_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of `fn()` over `reps` CUDA-event timings, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
