"""The one timing rule the benchmarks share: untimed warm-up calls, then the median of timed calls."""
from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int = 5, warmup: int = 1, reset=None) -> float:
    """Median wall-clock seconds of fn() over `repeats` calls, after `warmup` untimed calls.

    reset(), if given, runs untimed after every call (e.g. truncating a KV cache back to its prefix).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
        if reset is not None:
            reset()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if reset is not None:
            reset()
    return statistics.median(times)
