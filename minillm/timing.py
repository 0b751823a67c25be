"""The one timing rule every measurement in the package follows: untimed warm-up calls, then the
median of timed ones (the median, not the mean: a shared machine's hiccups land in the tail).

At the bottom of the package so that techniques can measure too (quant's impl="auto" times its
kernels with it), and so that training records where it ran (machine_settings, in every history and
results file); the benchmarks' reporting helpers are in bench/timing.py. Not a profiler: it
times whole calls with perf_counter, so a call must take well over a microsecond to mean anything.
"""
from __future__ import annotations

import functools
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


BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # the instructions bfloat16 matmuls run on, where the CPU has them


@functools.cache
def _proc_cpuinfo() -> str | None:
    """/proc/cpuinfo, read once a process (machine_line and machine_settings both ask); None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def cpu_info(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """(the CPU's model name, which of BF16_FLAGS it has), from /proc/cpuinfo on Linux (or the text given);
    elsewhere (platform.processor(), []). Two CPUs of one capability (AVX512) can run bfloat16 matmuls on
    different units: an AMD EPYC (Zen 4) on avx512_bf16, an Intel Xeon (Sapphire Rapids on) on AMX tiles too."""
    cpuinfo = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    if cpuinfo is None:
        return platform.processor() or "unknown CPU", []
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())      # the first processor's entry
    flags = set(fields.get("flags", "").split())
    return fields.get("model name") or platform.processor() or "unknown CPU", [f for f in BF16_FLAGS if f in flags]


def machine_line() -> str:
    """CPU, capability, bfloat16 instructions, threads and versions: printed above every table of figures."""
    name, bf16 = cpu_info()
    return (f"CPU {name} ({platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, bfloat16 on "
            f"{' + '.join(bf16) or 'no bf16 instructions'}), {torch.get_num_threads()} thread(s), torch {torch.__version__}")


def machine_settings() -> dict:
    """What every results file records about where and when it was measured."""
    name, bf16 = cpu_info()
    return dict(threads=torch.get_num_threads(), torch=torch.__version__,
                cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu=name, bf16_instructions=bf16,
                machine=machine_line(), date=time.strftime("%Y-%m-%d"),
                load_average_at_end=round(os.getloadavg()[0], 1))
