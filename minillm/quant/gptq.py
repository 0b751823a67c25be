"""GPTQ: quantize a layer's weights one column at a time, pushing each rounding error onto the columns not yet rounded.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (Frantar et al., 2022).
For a Linear with inputs X (tokens, K), the layer-wise objective is ||W X^T - Q X^T||^2; its Hessian
with respect to a row of W is H = 2 X^T X (the same for every row). Optimal Brain Quantization says:
after rounding column i to q_i, the best correction of the remaining columns F is

    W[:, F] -= (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_{i, F}

GPTQ's three ideas, each visible below:
1. same column order for every row, so one inverse Hessian serves all rows;
2. the rows of the upper Cholesky factor of H^-1 are exactly the [H_F^-1]_{i, :} / sqrt(...) needed at
   each step (no re-inversion as F shrinks), with a damping of 1% of the mean diagonal for stability;
3. lazy batch updates: the correction is applied inside a block of `block_size` columns and pushed to
   the rest of the matrix once per block (one matmul instead of K rank-1 updates).
Groups: each group's scale and offset are chosen when its first column is reached, from the weights
already corrected. Act-order (quantize columns of large H_ii first) uses "static groups": the group
parameters are fixed up front from the original W, so column k keeps group k // g and the packed
layout of formats.py is unchanged.

`gptq_quantize_ref` is the textbook loop (a rank-1 update after every column, no blocks); tests
assert both agree, that GPTQ equals RTN when H is the identity, and that GPTQ's output error is lower.
"""
from __future__ import annotations

import torch

from .calibration import block_inputs, check_calibration, collect_inputs
from .formats import Int4Linear, check_groups, group_params, quantize_with


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """H (K, K) -> upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so H^-1 = U^T U."""
    H = H.clone()
    dead = torch.diag(H) == 0          # inputs that are always zero: any value of their weights works
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _prepare(W, H, bits, group_size, symmetric, act_order):
    N, K = W.shape
    check_groups(W, group_size)
    W = W.clone()
    W[:, torch.diag(H) == 0] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    static = None
    if act_order:  # static groups: params from the original weights, group of column k stays k // g
        wg = W.reshape(N, K // group_size, group_size)
        static = group_params(wg, bits, symmetric)                                    # 2 x (N, G)
    return W[:, perm], H[perm][:, perm], perm, static


def gptq_quantize(W, H, bits: int = 4, group_size: int = 128, symmetric: bool = True, act_order: bool = False,
                  block_size: int = 128, damp: float = 0.01):
    """W (N, K), H (K, K) -> q uint8 (N, K), scales (N, K//g), offsets (N, K//g) in formats.py's layout."""
    N, K = W.shape
    if not act_order and block_size % group_size and group_size % block_size:
        raise ValueError(f"block_size {block_size} and group_size {group_size} must divide one another")
    W, H, perm, static = _prepare(W, H, bits, group_size, symmetric, act_order)
    U = inverse_hessian_factor(H, damp)                                               # (K, K)
    q_all = torch.zeros(N, K, dtype=W.dtype)
    scales = torch.zeros(N, K // group_size, dtype=W.dtype)
    offsets = torch.zeros_like(scales)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        W1, E1, U1 = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, dtype=W.dtype), U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(perm[b0 + i])                                  # the column's original index
            g = col // group_size
            if static is not None:
                scale, offset = static[0][:, g], static[1][:, g]
            elif col % group_size == 0:                              # first column of a group: choose its params
                end = i + group_size if i + group_size <= b1 - b0 else None
                group = W1[:, i:end] if end else torch.cat([W1[:, i:], W[:, b1:b0 + i + group_size]], 1)
                scale, offset = group_params(group, bits, symmetric)
            if static is None:
                scales[:, g], offsets[:, g] = scale, offset
            w = W1[:, i]
            q = quantize_with(w, scale, offset, bits)
            q_all[:, b0 + i] = q
            err = (w - (scale * q + offset)) / U1[i, i]                                # (N,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]                           # in-block update
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]                                               # lazy batch update
    if static is not None:
        scales, offsets = static
    q_all = q_all[:, torch.argsort(perm)]
    return q_all.to(torch.uint8), scales, offsets


def gptq_quantize_ref(W, H, bits: int = 4, group_size: int = 128, symmetric: bool = True, damp: float = 0.01):
    """The same algorithm without blocks: round column i, then update every later column at once."""
    N, K = W.shape
    W = W.clone()
    U = inverse_hessian_factor(H, damp)
    q_all = torch.zeros(N, K, dtype=W.dtype)
    scales = torch.zeros(N, K // group_size, dtype=W.dtype)
    offsets = torch.zeros_like(scales)
    for i in range(K):
        g = i // group_size
        if i % group_size == 0:
            scales[:, g], offsets[:, g] = group_params(W[:, i:i + group_size], bits, symmetric)
        q_all[:, i] = quantize_with(W[:, i], scales[:, g], offsets[:, g], bits)
        err = (W[:, i] - (scales[:, g] * q_all[:, i] + offsets[:, g])) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return q_all.to(torch.uint8), scales, offsets


# ----- the whole model, layer by layer (inputs from calibration.py) -----

@torch.no_grad()
def gptq_quantize_model(model, calibration, group_size: int = 128, symmetric: bool = True, act_order: bool = False,
                        block_size: int = 128, damp: float = 0.01, progress=None):
    """GPTQ every Linear of every block, in order; block i is calibrated on the outputs of the quantized blocks before it."""
    ids = check_calibration(model, calibration)
    x, cos, sin, mask = block_inputs(model, ids)
    for li, block in enumerate(model.layers):
        inputs, _ = collect_inputs(block, x, cos, sin, mask)
        for name, X in inputs.items():
            X = X.double()
            H = 2 * X.T @ X / X.shape[0]                                               # (K, K)
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, child)
            q, scales, offsets = gptq_quantize(linear.weight.double(), H, 4, group_size, symmetric,
                                               act_order, block_size, damp)
            setattr(parent, child, Int4Linear.from_quantized(q, scales.float(), offsets.float(), group_size))
        x = torch.cat([block(x[i:i + 4], cos[i:i + 4], sin[i:i + 4], mask[i:i + 4]) for i in range(0, x.shape[0], 4)])
        if progress:
            progress(li)
    return model
