"""What every benchmark shares: one timing rule (minillm/timing.py: untimed warm-up, then the
median of timed calls), decode speed measured through the package's own decoding loop, the machine's memory bandwidth,
and the line that says on what machine a figure was measured."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..decoding import decode_steps
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


def write_results(result: dict, out, log=print) -> None:
    """Write a bench's results as indented JSON (committed under data/), if `out` is given."""
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out}")
