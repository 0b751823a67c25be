"""Fused softmax: one read and one write of each row, instead of torch's several passes.

What you will learn:
- One program per row; the whole row sits in registers, so max, exp, sum and divide happen
  without going back to memory (a memory-bound kernel: fewer bytes moved = faster).
- Out-of-bounds lanes load -inf, which is harmless: exp(-inf) = 0.
- Rows longer than a block: the *online softmax* (Milakov & Gimelshein, 2018) keeps a running
  maximum m and a running sum l, rescaling l by exp(m_old - m_new) whenever the maximum grows.
  One pass computes (m, l), a second writes exp(x - m) / l. Flash attention uses the same trick.
- Arithmetic in float32 whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FLOAT_DTYPES, check_tensor, require_gpu

MAX_FUSED_BLOCK = 8192  # longest row kept whole in registers; longer rows use the online kernel


@triton.jit
def softmax_kernel(out_ptr,              # pointer to the output (n_rows, n_cols)
                   in_ptr,               # pointer to the input (n_rows, n_cols)
                   in_row_stride,        # elements between the starts of two input rows
                   out_row_stride,       # elements between the starts of two output rows
                   n_cols,               # row length
                   BLOCK: tl.constexpr):  # power of two >= n_cols
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(in_ptr + row * in_row_stride + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)  # subtract the max so exp cannot overflow
    numerator = tl.exp(x)
    y = numerator / tl.sum(numerator, axis=0)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def softmax_online_kernel(out_ptr,              # pointer to the output (n_rows, n_cols)
                          in_ptr,               # pointer to the input (n_rows, n_cols)
                          in_row_stride,        # elements between the starts of two input rows
                          out_row_stride,       # elements between the starts of two output rows
                          n_cols,               # row length (any, not a multiple of BLOCK)
                          BLOCK: tl.constexpr):  # columns handled per step
    row = tl.program_id(0)
    in_row = in_ptr + row * in_row_stride
    m = tl.full((BLOCK,), -float("inf"), tl.float32)  # running max, per lane
    l = tl.zeros((BLOCK,), tl.float32)                # running sum of exp(x - m), per lane
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(in_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a lane that has seen only -inf
        l = l * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    row_max = tl.max(m, axis=0)  # combine the lanes: rescale each lane's sum to the row max
    row_sum = tl.sum(l * tl.exp(m - row_max), axis=0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(in_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        y = tl.exp(x - row_max) / row_sum
        tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def softmax(x: torch.Tensor, online: bool | None = None, block: int = 1024) -> torch.Tensor:
    """Softmax over the last dimension of a contiguous float tensor.

    online=None picks the one-pass kernel when a row fits in MAX_FUSED_BLOCK, else the online one;
    block is the online kernel's step (a power of two).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    n_cols = x.shape[-1]
    x2 = x.view(-1, n_cols)  # (rows, cols)
    out = torch.empty_like(x2)
    if online is None:
        online = n_cols > MAX_FUSED_BLOCK
    if online:
        softmax_online_kernel[(x2.shape[0],)](out, x2, x2.stride(0), out.stride(0), n_cols, BLOCK=block)
    else:
        block = triton.next_power_of_2(n_cols)
        softmax_kernel[(x2.shape[0],)](out, x2, x2.stride(0), out.stride(0), n_cols, BLOCK=block)
    return out.view(x.shape)


def softmax_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def bench_softmax(n_rows: int = 4096, n_cols: int = 4096, dtype=torch.float16) -> dict:
    """GB/s of the fused kernel and of torch.softmax (one read and one write per element). GPU only."""
    require_gpu("bench_softmax")
    x = torch.randn(n_rows, n_cols, device="cuda", dtype=dtype)
    gbs = lambda ms: 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9  # noqa: E731
    ms_triton = triton.testing.do_bench(lambda: softmax(x))
    ms_torch = triton.testing.do_bench(lambda: torch.softmax(x, dim=-1))
    return {"kernel": "softmax", "shape": f"{n_rows}x{n_cols}", "dtype": str(dtype).removeprefix("torch."),
            "triton_ms": ms_triton, "torch_ms": ms_torch, "triton_gbs": gbs(ms_triton), "torch_gbs": gbs(ms_torch)}
