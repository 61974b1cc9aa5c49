"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` calls, after one warm-up call
    (CUDA work is synchronised around each call)."""
    return interleaved_median_seconds([fn], device, repeat)[0]


def interleaved_median_seconds(
    fns: list[Callable[[], object]], device: torch.device, repeat: int
) -> list[float]:
    """Median wall time of each of ``fns`` over ``repeat`` rounds that call them in turn,
    after one warm-up call each: a machine that speeds up or slows down during the run
    shifts every implementation alike, so ratios of the medians stay fair."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]
