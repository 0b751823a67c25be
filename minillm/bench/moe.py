"""`python -m minillm bench moe`: time the three MoE dispatches as tokens and experts grow.

Forward of one MoE layer's expert computation (routing excluded, the same for all), median of
several runs, on this machine's CPU; every variant is timed in the same run and compared with the
loop over experts. Timings on a shared machine are noisy: compare ratios, not absolute times.
"""
from __future__ import annotations

import torch

from ..moe.layer import dispatch_dense, dispatch_loop, dispatch_sorted, route, segment_matmul_loop
from ..progress import progress
from .timing import machine_line, median_seconds

VARIANTS = {
    "loop": dispatch_loop,
    "sorted_grouped_mm": dispatch_sorted,
    "sorted_split": lambda *a: dispatch_sorted(*a, matmul=segment_matmul_loop),
    "dense": dispatch_dense,
}


def time_ms(fn, repeats: int) -> float:
    return 1000 * median_seconds(fn, repeats)


@torch.no_grad()
def bench_dispatch(tokens=(64, 256, 1024, 4096), experts=(4, 8, 16, 32), k: int = 2, dim: int = 256,
                   hidden: int = 256, repeats: int = 5, dense_max_work: int = 2**16, verbose: bool = True):
    """Rows of {tokens, experts, <variant>_ms ..., <variant>_vs_loop ...}.

    dense runs every expert on every token; it is skipped (None) when tokens * experts > dense_max_work.
    """
    rows = []
    if verbose:
        print(machine_line(), flush=True)
    bar = progress(total=len(experts) * len(tokens), desc="bench moe: (experts, tokens)")
    for n_experts in experts:
        g = torch.Generator().manual_seed(0)
        router = torch.randn(n_experts, dim, generator=g)
        w1 = torch.randn(n_experts, hidden, dim, generator=g) / dim**0.5
        w3 = torch.randn(n_experts, hidden, dim, generator=g) / dim**0.5
        w2 = torch.randn(n_experts, dim, hidden, generator=g) / hidden**0.5
        for n_tokens in tokens:
            x = torch.randn(n_tokens, dim, generator=g)
            _, _, expert_idx, weight = route(x, router, k)
            args = (x, torch.arange(n_tokens).repeat_interleave(k), expert_idx.reshape(-1), weight.reshape(-1),
                    w1, w3, w2)
            row = {"tokens": n_tokens, "experts": n_experts}
            for name, fn in VARIANTS.items():
                skip = name == "dense" and n_tokens * n_experts > dense_max_work
                row[f"{name}_ms"] = None if skip else time_ms(lambda: fn(*args), repeats)
            for name in VARIANTS:
                ms = row[f"{name}_ms"]
                row[f"{name}_vs_loop"] = None if ms is None else row["loop_ms"] / ms
            rows.append(row)
            bar.update(1)
            if verbose:
                print(f"T={n_tokens:5d} E={n_experts:3d}  " + "  ".join(
                    f"{name} {row[name + '_ms']:8.2f} ms ({row[name + '_vs_loop']:.2f}x)" if row[name + "_ms"]
                    else f"{name} skipped" for name in VARIANTS), flush=True)
    bar.close()
    return rows
