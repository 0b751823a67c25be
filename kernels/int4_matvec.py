"""Weight-only int4 matrix-vector product for decoding: y = x W^T with W packed 4 bits per weight.

What you will learn:
- Why decoding is memory-bound: one token multiplies each weight once (2 FLOPs per weight), so the
  time is the time to read the weights. Reading 4-bit weights instead of 16-bit ones is ~4x less
  traffic; the goal is a kernel that streams the packed bytes at close to the memory bandwidth.
- Dequantizing in registers: each byte is loaded once, split into two nibbles with `& 0xF` and
  `>> 4`, scaled and offset per group, and multiplied with x; no float weight is ever written.
- A reduction along K per output row: each program owns BLOCK_N rows and walks K in BLOCK_K steps.

The packed layout is minillm.quant's (the quantization chapter), for W (N out, K in), groups of g along K:
    packed  uint8 (N, K // 2): byte j of a row holds column 2j in its low nibble, 2j + 1 in its high nibble
    scales, offsets  float (N, K // g);  W[n, k] = scales[n, k // g] * q[n, k] + offsets[n, k // g]
Not handled: large batches (prefill), where the product is compute-bound and a tiled `tl.dot` kernel
over dequantized tiles would be the right design; here each input row gets its own pass over W.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FLOAT_DTYPES, check_tensor, interpreting, require_gpu


@triton.jit
def int4_matvec_kernel(out_ptr,               # pointer to y (M, N)
                       x_ptr,                 # pointer to x (M, K)
                       packed_ptr,            # pointer to the packed weights, uint8 (N, K // 2)
                       scales_ptr,            # pointer to the group scales (N, K // GROUP)
                       offsets_ptr,           # pointer to the group offsets (N, K // GROUP)
                       N, K,                  # output and input features
                       GROUP: tl.constexpr,   # group size g along K (even)
                       BLOCK_N: tl.constexpr,  # output rows per program
                       BLOCK_K: tl.constexpr):  # input columns per step (even)
    tile, m = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, K, BLOCK_K):
        byte = start // 2 + tl.arange(0, BLOCK_K // 2)          # (BLOCK_K/2,) byte index within a row
        valid = (rows[:, None] < N) & (byte[None, :] < K // 2)  # (BLOCK_N, BLOCK_K/2)
        packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + byte[None, :], mask=valid, other=0)
        q_even = (packed & 0xF).to(tl.float32)  # column 2j
        q_odd = (packed >> 4).to(tl.float32)    # column 2j + 1
        group = (2 * byte) // GROUP             # 2j and 2j + 1 share a group because GROUP is even
        scale = tl.load(scales_ptr + rows[:, None] * n_groups + group[None, :], mask=valid, other=0.0)
        offset = tl.load(offsets_ptr + rows[:, None] * n_groups + group[None, :], mask=valid, other=0.0)
        x_even = tl.load(x_ptr + m * K + 2 * byte, mask=2 * byte < K, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + m * K + 2 * byte + 1, mask=2 * byte + 1 < K, other=0.0).to(tl.float32)
        w_even = scale.to(tl.float32) * q_even + offset.to(tl.float32)  # dequantized in registers
        w_odd = scale.to(tl.float32) * q_odd + offset.to(tl.float32)
        acc += tl.sum(w_even * x_even[None, :] + w_odd * x_odd[None, :], axis=1)
    tl.store(out_ptr + m * N + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


def check_packed(packed, scales, offsets, group_size: int) -> tuple[int, int]:
    """Validate the packed int4 layout; return (N, K)."""
    check_tensor("packed", packed, ndim=2, dtypes=(torch.uint8,))
    check_tensor("scales", scales, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("offsets", offsets, ndim=2, dtypes=FLOAT_DTYPES)
    N, K = packed.shape[0], 2 * packed.shape[1]
    if group_size < 2 or group_size % 2 or K % group_size:
        raise ValueError(f"group_size must be even and divide K={K}, got {group_size}")
    if scales.shape != (N, K // group_size) or offsets.shape != scales.shape:
        raise ValueError(f"scales and offsets must have shape {(N, K // group_size)}, "
                         f"got {tuple(scales.shape)} and {tuple(offsets.shape)}")
    return N, K


def int4_matvec(x: torch.Tensor, packed, scales, offsets, group_size: int,
                block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """x (..., K) -> x W^T (..., N) in x's dtype, with W given in minillm.quant's packed int4 layout."""
    N, K = check_packed(packed, scales, offsets, group_size)
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.ndim == 0 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must be K={K} (the packed weight's input width), got {tuple(x.shape)}")
    block_n = block_n or (256 if interpreting() else 64)  # the interpreter pays per step, not per lane
    block_k = block_k or min(256, max(16, triton.next_power_of_2(K)))
    if block_k < 2 or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_n and block_k must be powers of two (block_k >= 2), got {block_n}, {block_k}")
    x2 = x.reshape(-1, K)  # (M, K)
    out = torch.empty((x2.shape[0], N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, block_n), x2.shape[0])
    int4_matvec_kernel[grid](out, x2, packed, scales, offsets, N, K, GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.reshape(*x.shape[:-1], N)


def dequantize_int4_ref(packed, scales, offsets, group_size: int) -> torch.Tensor:
    """The layout spelled out in torch: unpack the nibbles, then W = scale * q + offset per group -> float32 (N, K)."""
    low, high = packed & 0x0F, packed >> 4                                # column 2j, column 2j + 1
    q = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)     # (N, K)
    expand = lambda t: t.float().repeat_interleave(group_size, dim=1)     # noqa: E731  (N, K//g) -> (N, K)
    return expand(scales) * q.float() + expand(offsets)


def int4_matvec_ref(x, packed, scales, offsets, group_size: int) -> torch.Tensor:
    return (x.float() @ dequantize_int4_ref(packed, scales, offsets, group_size).T).to(x.dtype)


def random_int4_weight(n: int, k: int, group_size: int, device=None, generator=None):
    """Random packed weights, scales and offsets in the layout above (for tests and benchmarks)."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(device)
    scales = (torch.rand(n, k // group_size, generator=generator) * 0.02 + 0.001).to(device)
    offsets = (-8 * scales).contiguous()
    return packed, scales, offsets


def bench_int4_matvec(n: int = 8192, k: int = 8192, group_size: int = 128, dtype=torch.float16) -> dict:
    """GB/s streamed by the kernel for one token (packed weights + scales/offsets + x + y), next to a
    dense fp16 matvec (torch, cuBLAS) on the same shape. Compare triton_gbs with the device's bandwidth. GPU only."""
    require_gpu("bench_int4_matvec")
    packed, scales, offsets = random_int4_weight(n, k, group_size, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    dense = dequantize_int4_ref(packed, scales, offsets, group_size).to(dtype)  # (N, K)
    moved = packed.numel() + 2 * scales.numel() * scales.element_size() + (k + n) * x.element_size()
    ms_triton = triton.testing.do_bench(lambda: int4_matvec(x, packed, scales, offsets, group_size))
    ms_torch = triton.testing.do_bench(lambda: x @ dense.T)
    return {"kernel": "int4_matvec", "shape": f"1x{k} @ ({n}x{k}), g={group_size}",
            "dtype": str(dtype).removeprefix("torch."),
            "triton_ms": ms_triton, "torch_ms": ms_torch, "triton_gbs": moved / (ms_triton * 1e-3) / 1e9,
            "torch_gbs": (dense.numel() * dense.element_size() + (k + n) * x.element_size()) / (ms_torch * 1e-3) / 1e9}
