"""Data mixture inference: reading a training mix back out of a BPE merge list.

Hayase et al., "Data Mixture Inference: What do BPE Tokenizers Reveal about their Training Data?"
(2024). BPE takes, at every step, the pair most frequent in the *whole* training text. If that text
mixes categories (English, code, ...) in byte proportions alpha_i, and we can estimate each
category's pair frequencies from samples of it, then every merge t gives linear constraints:

    sum_i alpha_i f_i^t(merged pair)  >=  sum_i alpha_i f_i^t(p)      for every other pair p,

with f_i^t the frequency per byte of a pair in category i after merges 1..t-1 are applied to it.
The paper solves a linear program over many categories, with slack for sampling noise. With two
categories alpha is one number, so we scan a grid for the alpha that violates the constraints least.

Not handled: more than two categories (use an LP), the paper's lazy constraint generation (we
only check the `top` most frequent pairs of each sample at each step).
"""
from __future__ import annotations

import heapq

import numpy as np

from .bpe import ChunkPairs


def merge_constraints(samples: list[str], merges: dict[tuple[int, int], int], pattern: str,
                      steps: int, top: int = 20) -> np.ndarray:
    """One row per (merge t, rival pair p): f_i^t(p) - f_i^t(merged pair) for each sample i.

    A mix `alpha` (weights over samples) is consistent with merge t if `rows @ alpha <= 0`.
    Returns shape (constraints, len(samples)).
    """
    replays = [ChunkPairs(text, pattern) for text in samples]
    sizes = np.array([len(text.encode("utf-8")) for text in samples], dtype=np.float64)
    rows = []
    for pair, new_id in list(merges.items())[:steps]:
        rivals = set()
        for r in replays:
            rivals.update(heapq.nlargest(top, r.counts, key=r.counts.get))
        rivals.discard(pair)
        chosen = np.array([r.counts.get(pair, 0) for r in replays]) / sizes
        for p in sorted(rivals):
            rows.append(np.array([r.counts.get(p, 0) for r in replays]) / sizes - chosen)
        for r in replays:
            r.apply(pair, new_id)
    return np.array(rows)


def infer_proportion(constraints: np.ndarray, grid: int = 1001) -> float:
    """The share of the first of two categories that violates the merge constraints least.

    Total violation of alpha: sum over rows of max(0, row @ (alpha, 1 - alpha)).
    """
    if constraints.shape[1] != 2:
        raise ValueError(f"grid search handles 2 categories, got {constraints.shape[1]}")
    alphas = np.linspace(0.0, 1.0, grid)
    weights = np.stack([alphas, 1.0 - alphas])  # (2, grid)
    violation = np.maximum(0.0, constraints @ weights).sum(axis=0)  # (grid,)
    return float(alphas[np.argmin(violation)])
