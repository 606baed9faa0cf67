"""Timers the benchmarks share (run a script as `python benchmarks/NAME.py`: this folder is on its path; the GPU
stages in benchmarks/gpu put it there)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` runs of `fn()`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median_time(fn, reps: int) -> float:
    """The median of `reps` runs of `fn()` after one warm-up run (which compiles flex on its first shape), in seconds."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timer(device: str, repeats: int, warmup: int = 2) -> Callable[[Callable], float]:
    """A function timing `fn()` in ms: CUDA events on a GPU, perf_counter on the CPU; mean of `repeats`."""
    def measure(fn: Callable) -> float:
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / repeats
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats
    return measure
