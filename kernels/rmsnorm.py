"""Fused RMSNorm with the residual add: h = x + residual; y = h / rms(h) * weight, in one pass.

What you will learn:
- Fusion for a memory-bound op: the unfused block reads x and residual, writes h, reads h back,
  and writes y (5 row transfers); the fused kernel reads x and residual and writes h and y (4),
  with no intermediate kernel launches.
- A reduction along the row (mean of squares) inside one program, then an elementwise pass on
  the same registers.
- Mixed precision as Llama does it: storage in fp16/bf16/fp32, arithmetic in float32.

The transformer block is `h = x + attn(norm1(x)); out = h + ffn(norm2(h))`; the fused form
computes norm2's input and output together: `y, h = rmsnorm(attn_out, w, eps, residual=x)`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FLOAT_DTYPES, check_tensor, require_gpu


@triton.jit
def rmsnorm_kernel(out_ptr,                # pointer to the normalized output (rows, dim)
                   sum_ptr,                # pointer to where h = x + residual is written (unused if no residual)
                   x_ptr,                  # pointer to the input (rows, dim)
                   residual_ptr,           # pointer to the residual (rows, dim) (unused if no residual)
                   weight_ptr,             # pointer to the scale (dim,)
                   dim,                    # row length
                   eps,                    # added to the mean square, for stability
                   HAS_RESIDUAL: tl.constexpr,  # compile a variant with / without the residual add
                   BLOCK: tl.constexpr):   # power of two >= dim
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_bounds = cols < dim
    offsets = row * dim + cols
    h = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        h = h.to(sum_ptr.dtype.element_ty)  # the residual stream is stored in the model's dtype
        tl.store(sum_ptr + offsets, h, mask=in_bounds)
        h = h.to(tl.float32)
    mean_square = tl.sum(h * h, axis=0) / dim  # masked lanes are 0 and add nothing
    weight = tl.load(weight_ptr + cols, mask=in_bounds, other=0.0).to(tl.float32)
    y = h * tl.rsqrt(mean_square + eps) * weight
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=in_bounds)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dimension. Returns y, or (y, x + residual) when residual is given."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
    dim = x.shape[-1] if x.ndim else 0
    if dim == 0 or weight.shape[0] != dim:
        raise ValueError(f"weight must have shape ({dim},) to match x's last dimension, "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x: x is {tuple(x.shape)} {x.dtype}, "
                             f"residual is {tuple(residual.shape)} {residual.dtype}")
    rows = x.numel() // dim
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out  # out is a dummy pointer when unused
    rmsnorm_kernel[(rows,)](out, summed, x, residual if residual is not None else x, weight, dim, eps,
                            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(dim))
    return (out, summed) if residual is not None else out


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """minillm.model.RMSNorm's arithmetic, with the residual add in front."""
    h = x + residual if residual is not None else x
    h32 = h.float()
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (y, h) if residual is not None else y


def bench_rmsnorm(rows: int = 4096, dim: int = 4096, dtype=torch.bfloat16) -> dict:
    """GB/s of the fused kernel and of the unfused torch add + norm (4 row transfers counted). GPU only."""
    require_gpu("bench_rmsnorm")
    x, r = (torch.randn(rows, dim, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(dim, device="cuda", dtype=dtype)
    gbs = lambda ms: 4 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9  # noqa: E731
    ms_triton = triton.testing.do_bench(lambda: rmsnorm(x, w, 1e-5, residual=r))
    ms_torch = triton.testing.do_bench(lambda: rmsnorm_ref(x, w, 1e-5, residual=r))
    return {"kernel": "rmsnorm+residual", "shape": f"{rows}x{dim}", "dtype": str(dtype).removeprefix("torch."),
            "triton_ms": ms_triton, "torch_ms": ms_torch, "triton_gbs": gbs(ms_triton), "torch_gbs": gbs(ms_torch)}
