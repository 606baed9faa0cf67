"""Wall-clock timers the CPU benchmarks share (run a script as `python benchmarks/NAME.py`: this folder is on its path)."""
from __future__ import annotations

import statistics
import time


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
