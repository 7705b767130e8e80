"""Helpers shared by the benchmarks: a measured fp32 matmul peak and a robust timer."""

import statistics
import time

import torch


def median_seconds(fn, *, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(size: int = 2048) -> float:
    """Achieved fp32 FLOP/s of one square matmul on this machine (the ceiling a training step is held to)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats=7)
    return 2 * size**3 / seconds
