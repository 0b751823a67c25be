"""The one timing rule every measurement in the package follows: untimed warm-up calls, then the
median of timed ones (the median, not the mean: a shared machine's hiccups land in the tail).

At the bottom of the package so that techniques can measure too (quant's impl="auto" times its
kernels with it), and so that training records where it ran (machine_settings, in every history and
results file); the benchmarks' reporting helpers are in bench/timing.py. Not a profiler: it
times whole calls with perf_counter, so a call must take well over a microsecond to mean anything.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


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


def machine_line() -> str:
    """CPU capability, threads and versions: printed above every table of figures."""
    return (f"CPU {platform.machine()} capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")


def machine_settings() -> dict:
    """What every results file records about where and when it was measured."""
    return dict(threads=torch.get_num_threads(), torch=torch.__version__,
                cpu_capability=torch.backends.cpu.get_cpu_capability(), machine=machine_line(),
                date=time.strftime("%Y-%m-%d"), load_average_at_end=round(os.getloadavg()[0], 1))
