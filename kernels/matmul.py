"""Tiled matrix multiplication: C = A @ B with `tl.dot` on tiles held in registers/shared memory.

What you will learn:
- Each program computes one BLOCK_M x BLOCK_N tile of C, walking along K in BLOCK_K steps and
  accumulating in float32; `tl.dot` maps a tile product onto the tensor cores.
- Pointers to a 2-D tile: rows[:, None] * stride_row + cols[None, :] * stride_col.
- Grouped ordering: launching tiles row by row reads all of B once per row of tiles; visiting
  GROUP_M rows of tiles column by column instead reuses the same B columns while they are still
  in the L2 cache.
- Autotuning: the best block sizes depend on the GPU and the shape, so `triton.autotune` times a
  few configurations once per (M, N, K) and remembers the fastest. (Under the CPU interpreter
  timing means nothing, so one fixed configuration is used.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FLOAT_DTYPES, check_no_interpreted_bf16, check_tensor, interpreting, require_gpu


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr,         # pointers to A (M, K), B (K, N), C (M, N)
                  M, N, K,                     # problem sizes
                  stride_am, stride_ak,        # element strides of A
                  stride_bk, stride_bn,        # element strides of B
                  stride_cm, stride_cn,        # element strides of C
                  BLOCK_M: tl.constexpr,       # rows of C per program
                  BLOCK_N: tl.constexpr,       # columns of C per program
                  BLOCK_K: tl.constexpr,       # depth of one step along K
                  GROUP_M: tl.constexpr,       # rows of tiles visited together, for L2 reuse
                  PRECISION: tl.constexpr):    # "ieee" for exact float32, "tf32" for speed
    # Grouped ordering: program id -> (tile row, tile column), GROUP_M tile rows at a time.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)  # the last group may be short
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + depth[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + depth[:, None] * stride_bk + cols[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (depth[None, :] + k < K), other=0.0)
        b = tl.load(b_ptrs, mask=(depth[:, None] + k < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


_CONFIGS = [  # a few shapes from the Triton tutorial that do well on A100/H100 for fp16/bf16
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=5, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
]
matmul_kernel_autotuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(matmul_kernel)


def matmul(a: torch.Tensor, b: torch.Tensor, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) in a's dtype (float32 accumulation).

    blocks=(BLOCK_M, BLOCK_N, BLOCK_K) fixes the tile sizes (powers of two >= 16); by default the
    GPU autotunes and the interpreter uses (64, 64, 32) (fewer, larger numpy steps).
    """
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES, contiguous=False)
    check_tensor("b", b, ndim=2, dtypes=FLOAT_DTYPES, contiguous=False)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    check_no_interpreted_bf16("a", a)
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    args = (a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride())
    precision = "ieee" if a.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    if blocks is None and not interpreting():
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        matmul_kernel_autotuned[grid](*args, PRECISION=precision)
        return c
    bm, bn, bk = blocks or (64, 64, 32)
    if min(bm, bn, bk) < 16 or any(x & (x - 1) for x in (bm, bn, bk)):
        raise ValueError(f"blocks must be powers of two >= 16 (tl.dot's minimum), got {(bm, bn, bk)}")
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    matmul_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4, PRECISION=precision)
    return c


def matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() @ b.float()).to(a.dtype)


def bench_matmul(size: int = 4096, dtype=torch.bfloat16) -> dict:
    """TFLOP/s of the autotuned kernel and of torch.matmul (cuBLAS) at size^3. GPU only."""
    require_gpu("bench_matmul")
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    tflops = lambda ms: 2 * size**3 / (ms * 1e-3) / 1e12  # noqa: E731
    ms_triton = triton.testing.do_bench(lambda: matmul(a, b))
    ms_torch = triton.testing.do_bench(lambda: torch.matmul(a, b))
    return {"kernel": "matmul", "shape": f"{size}^3", "dtype": str(dtype).removeprefix("torch."),
            "triton_ms": ms_triton, "torch_ms": ms_torch,
            "triton_tflops": tflops(ms_triton), "torch_tflops": tflops(ms_torch)}
