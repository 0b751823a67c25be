"""What every benchmark shares: one timing rule (minillm/timing.py: untimed warm-up, then the
median of timed calls; here also in rounds that take turns), decode speed measured through the package's own decoding loop, the machine's memory bandwidth,
and the line that says on what machine a figure was measured."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch

from ..decoding.loop import decode_steps
from ..progress import progress
from ..timing import machine_line, machine_settings, median_seconds  # noqa: F401  (re-exported for the benches)


def decode_tok_s(model, ids, steps: int, cache="static", **decode_options) -> float:
    """Tokens per second of decoding.decode_steps generating `steps` tokens after the context ids (B, T),
    counted over all B rows. The prefill and one warm-up forward (lazy layouts, the allocator) are not timed."""
    steps_iter = decode_steps(model, ids, steps + 2, eos_token_id=None, cache=cache, **decode_options)
    next(steps_iter)                                   # the prefill's token
    next(steps_iter)                                   # one warm-up forward
    produced, start = 0, time.perf_counter()
    for chunks in steps_iter:
        produced += sum(len(row) for row in chunks)
    return produced / (time.perf_counter() - start)


def median_of_rounds(measures: dict, rounds: int, warmup: int = 0, desc: str | None = None) -> dict:
    """Each of `measures` ({key: fn() -> a figure, e.g. seconds}) called once per round, in turn, for `warmup`
    untimed rounds and then `rounds` counted ones; the median of each key's figures. In turns, so that on a shared
    machine a slow spell lands on one round of every key instead of on all the figures of one. desc: a progress
    bar by that name, one step a round."""
    figures = {key: [] for key in measures}
    all_rounds = range(warmup + rounds)
    for round_ in (progress(all_rounds, desc=desc) if desc else all_rounds):
        for key, fn in measures.items():
            figure = fn()
            if round_ >= warmup:
                figures[key].append(figure)
    return {key: statistics.median(fs) for key, fs in figures.items()}


def sandwiched(baseline, measures: dict) -> tuple[list, dict]:
    """One round of speedups against a baseline on a shared machine: the baseline (fn() -> seconds) runs before
    the first of `measures` ({key: fn() -> seconds}), between every two and after the last, and each key's
    ratio is the mean of the two baseline runs beside it over its own seconds. A slow spell then lands on a
    measure and the baseline runs around it alike, instead of on some measures and not on a baseline timed
    once a round. Returns (the baseline's seconds, {key: (seconds, ratio)})."""
    base, out = [baseline()], {}
    for key, fn in measures.items():
        seconds = fn()
        base.append(baseline())
        out[key] = (seconds, (base[-2] + base[-1]) / 2 / seconds)
    return base, out


def memory_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Best of `repeats` copies of a large float32 tensor: (bytes read + bytes written) / seconds."""
    src = torch.ones(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


class PeakRSS:
    """The largest resident memory of this process while the `with` block runs, sampled by a thread every
    `interval` seconds (50 a second: a decode's memory is flat, and each sample takes the GIL): what a step
    costs to hold and run (its weights, caches, compiled code, the runtime), without a process of its own. The load before the block, and its own transient peak, are not counted: on
    entering, freed memory is handed back to the OS first (glibc's malloc_trim, where there is one), or what an
    earlier, larger model left in the allocator would be counted as this step's.

        with PeakRSS() as mem:
            decode(...)
        mem.peak_mb
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, 0.0
        self._process, self._stop = psutil.Process(), threading.Event()

    def _sample(self):
        self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2 ** 20)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        gc.collect()
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False


def results_file(name: str) -> str | None:
    """Where a bench writes its results by default: data/NAME under the current directory when there is one (the
    repository's root, where they are committed), else nowhere (--out names a file)."""
    return str(Path("data") / name) if Path("data").is_dir() else None


def write_results(result: dict, out, log=print) -> None:
    """Write a bench's results as indented JSON, if `out` is given."""
    if not out:
        log("results not written: no data/ folder here (run from the repository's root, or pass --out)")
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out}")
