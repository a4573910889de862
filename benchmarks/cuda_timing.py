"""Median device time of a GPU call, for the one-op benchmarks in benchmarks/ (each run as its own process)."""

from __future__ import annotations

import torch

CALLS, WARMUP = 20, 3


def median_ms(fn) -> float:
    """Median device time of `fn(i)` over CALLS calls after WARMUP (CUDA events, synchronised per call)."""
    times = []
    for i in range(WARMUP + CALLS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
