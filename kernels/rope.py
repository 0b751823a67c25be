"""Rotary position embeddings computed in the kernel: no cos/sin tables read from memory.

What you will learn:
- 2-D blocks over (positions, pairs): each program rotates BLOCK_T rows of one (batch, head).
- Computing instead of loading: the angle of pair i at position p is p * inv_freq[i]; cos and
  sin are evaluated in registers, which is cheaper than reading two (T, d) tables from memory.
- Strided inputs: q and k come out of the projection as (B, T, h, d) viewed as (B, h, T, d), so the
  kernel takes the strides of each axis instead of demanding a contiguous copy.

Layout: the "rotate half" convention of HF Llama and minillm.model, pairs (i, i + d/2):
    out[:d/2] = x[:d/2] cos - x[d/2:] sin,   out[d/2:] = x[d/2:] cos + x[:d/2] sin
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FLOAT_DTYPES, check_tensor, require_gpu


@triton.jit
def rope_kernel(out_ptr,                    # pointer to the output (B, H, T, d), contiguous
                x_ptr,                      # pointer to the input (B, H, T, d), any strides but the last = 1
                pos_ptr,                    # pointer to positions (B, T), contiguous int64
                inv_freq_ptr,               # pointer to theta^(-2i/d) for i < d/2, float32
                H, T,                       # heads and sequence length
                stride_b, stride_h, stride_t,  # element strides of x
                HALF: tl.constexpr,         # d / 2
                BLOCK_T: tl.constexpr,      # positions per program
                BLOCK_HALF: tl.constexpr):  # power of two >= HALF
    bh, tile = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)       # (BLOCK_T,)
    i = tl.arange(0, BLOCK_HALF)                     # (BLOCK_HALF,)
    valid = (t[:, None] < T) & (i[None, :] < HALF)   # (BLOCK_T, BLOCK_HALF)
    pos = tl.load(pos_ptr + b * T + t, mask=t < T, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]         # same float32 product as the torch version
    cos, sin = tl.cos(angle), tl.sin(angle)
    x_row = x_ptr + b * stride_b + h * stride_h + t[:, None] * stride_t
    x1 = tl.load(x_row + i[None, :], mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + i[None, :], mask=valid, other=0.0).to(tl.float32)
    out_row = out_ptr + (bh * T + t[:, None]) * (2 * HALF)
    tl.store(out_row + i[None, :], (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(out_row + HALF + i[None, :], (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=valid)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2, computed exactly as minillm.model.rope_cos_sin does."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, block_t: int = 16) -> torch.Tensor:
    """Rotate x (B, h, T, d) by positions (B, T) -> a new contiguous (B, h, T, d) tensor."""
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES, contiguous=False)
    check_tensor("positions", positions, ndim=2, dtypes=(torch.int32, torch.int64), contiguous=False)
    B, H, T, d = x.shape
    if x.stride(-1) != 1:
        raise ValueError(f"x's last dimension must be contiguous (stride 1), got strides {x.stride()}")
    if d % 2:
        raise ValueError(f"head dimension must be even for RoPE, got {d}")
    if positions.shape != (B, T):
        raise ValueError(f"positions must have shape {(B, T)} to match x {tuple(x.shape)}, got {tuple(positions.shape)}")
    out = torch.empty((B, H, T, d), device=x.device, dtype=x.dtype)
    grid = (B * H, triton.cdiv(T, block_t))
    rope_kernel[grid](out, x, positions.to(torch.int64).contiguous(), rope_inv_freq(d, theta, x.device),
                      H, T, x.stride(0), x.stride(1), x.stride(2),
                      HALF=d // 2, BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(d // 2))
    return out


def rope_ref(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """minillm.model's RoPE: cos/sin tables, then x cos + rotate_half(x) sin."""
    from minillm.model import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    return apply_rope(x, cos, sin)


def bench_rope(batch: int = 8, heads: int = 32, seq: int = 4096, head_dim: int = 128, dtype=torch.bfloat16) -> dict:
    """GB/s of the kernel and of the torch version (one read and one write of x counted). GPU only."""
    require_gpu("bench_rope")
    x = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype)
    pos = torch.arange(seq, device="cuda").expand(batch, seq)
    gbs = lambda ms: 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9  # noqa: E731
    ms_triton = triton.testing.do_bench(lambda: rope(x, pos, 10000.0, block_t=64))
    ms_torch = triton.testing.do_bench(lambda: rope_ref(x, pos, 10000.0))
    return {"kernel": "rope", "shape": f"{batch}x{heads}x{seq}x{head_dim}", "dtype": str(dtype).removeprefix("torch."),
            "triton_ms": ms_triton, "torch_ms": ms_torch, "triton_gbs": gbs(ms_triton), "torch_gbs": gbs(ms_torch)}
