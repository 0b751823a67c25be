"""Vector add: the Triton programming model in ten lines.

What you will learn:
- A kernel is run by a *grid* of programs; `tl.program_id(0)` says which one this is.
- Each program handles one BLOCK of elements at once: `tl.arange(0, BLOCK)` is a vector of
  offsets, and pointer + offsets is a vector of addresses.
- The last block usually runs past the end, so loads and stores take a `mask`.
- BLOCK is a `tl.constexpr`: a compile-time constant (it must be a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FLOAT_DTYPES, check_tensor, require_gpu


@triton.jit
def add_kernel(x_ptr,                  # pointer to the first input vector
               y_ptr,                  # pointer to the second input vector
               out_ptr,                # pointer to the output vector
               n_elements,             # length of the vectors
               BLOCK: tl.constexpr):   # elements per program
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    in_bounds = offsets < n_elements             # the last block may run past the end
    x = tl.load(x_ptr + offsets, mask=in_bounds).to(tl.float32)  # float32 math (the interpreter
    y = tl.load(y_ptr + offsets, mask=in_bounds).to(tl.float32)  # cannot add bfloat16 directly)
    tl.store(out_ptr + offsets, (x + y).to(out_ptr.dtype.element_ty), mask=in_bounds)


def add(x: torch.Tensor, y: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x + y for two contiguous tensors of the same shape and dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("y", y, dtypes=FLOAT_DTYPES)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"x and y must match: got {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}")
    out = torch.empty_like(x)
    n = x.numel()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731  one program per block
    add_kernel[grid](x, y, out, n, BLOCK=block)
    return out


def add_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def bench_add(n: int = 2**26, dtype=torch.float32) -> dict:
    """GB/s of the kernel and of torch's `x + y` (3 arrays moved per element). GPU only."""
    require_gpu("bench_add")
    x, y = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    gbs = lambda ms: 3 * n * x.element_size() / (ms * 1e-3) / 1e9  # noqa: E731
    ms_triton = triton.testing.do_bench(lambda: add(x, y))
    ms_torch = triton.testing.do_bench(lambda: add_ref(x, y))
    return {"kernel": "vector_add", "shape": f"{n}", "dtype": str(dtype).removeprefix("torch."),
            "triton_ms": ms_triton, "torch_ms": ms_torch, "triton_gbs": gbs(ms_triton), "torch_gbs": gbs(ms_torch)}
