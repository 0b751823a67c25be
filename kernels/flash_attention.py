"""Flash attention, forward: softmax(q k^T / sqrt(d)) v without ever storing the (T, S) scores.

What you will learn:
- Tiling attention (Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention
  with IO-Awareness"): a program owns BLOCK_M query rows and walks over the keys BLOCK_N at a time.
  Scores live in registers only; memory traffic is q, k, v and the output, not T x S.
- The online softmax again: a running max m and sum l per row; when m grows, the partial sum and
  the partial output are rescaled by exp(m_old - m_new). Done in base 2 (exp2) with log2(e) folded
  into the scale, which is what the hardware computes natively.
- Causal masking by index (query i sees keys j <= i + S - T: the queries are the *last* T of the S
  positions, as when decoding after a KV cache) and skipping key blocks wholly in the future.
- Grouped-query attention: query head h reads key/value head h // (H // H_kv); nothing is copied.
- An arbitrary boolean mask (B or 1, 1, T, S), True = may attend, loaded tile by tile: the tree
  masks of chapter 6 and the padding masks of the KV cache go through the same kernel.

Rows with no allowed key at all output 0 (the textbook softmax would give 0/0 = NaN).
Not handled: the backward pass, dropout, attention bias/ALiBi, a fused KV-cache write.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minillm.model import attention_ref as model_attention_ref

from . import FLOAT_DTYPES, check_no_interpreted_bf16, check_tensor, interpreting, require_gpu


@triton.jit
def flash_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr,        # pointers to o, q (B, H, T, d) and k, v (B, H_kv, S, d)
        mask_ptr,                            # pointer to a uint8 mask (B or 1, 1, T, S) (unused if no mask)
        stride_qb, stride_qh, stride_qt,     # element strides of q (its last axis has stride 1)
        stride_kb, stride_kh, stride_ks,     # element strides of k
        stride_vb, stride_vh, stride_vs,     # element strides of v
        stride_ob, stride_oh, stride_ot,     # element strides of the output
        stride_mb, stride_mt, stride_ms,     # element strides of the mask (0 where broadcast)
        H, T, S, HEAD_DIM,                   # query heads, queries, keys, head dimension
        GROUPS,                              # query heads per key/value head (GQA)
        qk_scale,                            # log2(e) / sqrt(d): scores in base-2 units
        HAS_MASK: tl.constexpr,              # read the boolean mask
        CAUSAL: tl.constexpr,                # key j visible to query i iff j <= i + S - T
        BLOCK_M: tl.constexpr,               # queries per program
        BLOCK_N: tl.constexpr,               # keys per step
        BLOCK_D: tl.constexpr,               # power of two >= HEAD_DIM
        PRECISION: tl.constexpr):            # "ieee" for exact float32 dots
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kv_h = h // GROUPS
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query indices
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                mask=(rows[:, None] < T) & (dims[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh

    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)  # running max of the scores (base 2)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)        # running sum of exp2(score - m_i) * v
    end = S
    if CAUSAL:  # keys past the tile's last query are never visible: do not even load them
        end = tl.minimum(S, (tile + 1) * BLOCK_M + S - T)
    for start in range(0, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        k_t = tl.load(k_base + keys[None, :] * stride_ks + dims[:, None],
                      mask=(keys[None, :] < S) & (dims[:, None] < HEAD_DIM), other=0.0)  # (BLOCK_D, BLOCK_N)
        scores = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale                  # (BLOCK_M, BLOCK_N)
        allowed = (keys[None, :] < S) & (rows[:, None] < T)
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= rows[:, None] + S - T)
        if HAS_MASK:
            user = tl.load(mask_ptr + b * stride_mb + rows[:, None] * stride_mt + keys[None, :] * stride_ms,
                           mask=allowed, other=0)
            allowed = allowed & (user != 0)
        scores = tl.where(allowed, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows that have seen no allowed key yet
        p = tl.exp2(scores - m_safe[:, None])                  # (BLOCK_M, BLOCK_N), 0 where masked
        alpha = tl.exp2(m_i - m_safe)                          # rescales what was summed so far
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vs + dims[None, :],
                    mask=(keys[:, None] < S) & (dims[None, :] < HEAD_DIM), other=0.0)    # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with nothing allowed stays 0
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < T) & (dims[None, :] < HEAD_DIM))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    causal: bool = False, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """q (B, H, T, d), k and v (B, H_kv, S, d) with H_kv dividing H -> (B, H, T, d).

    mask: bool (B or 1, 1, T, S), True where query t may attend key s; combined with `causal` if both.
    blocks: (BLOCK_M, BLOCK_N), powers of two >= 16; default (128, 64) on a GPU, and (64, 64) on the
        interpreter (it pays per step, not per element, so fewer and larger steps run faster).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, contiguous=False)
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must have stride 1, got strides {t.stride()}")
    check_no_interpreted_bf16("q", q)
    (B, H, T, d), (Bk, H_kv, S, dk) = q.shape, k.shape
    if k.shape != v.shape or (Bk, dk) != (B, d) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k and v must be (B={B}, H_kv, S, d={d}) in {q.dtype}; got k {tuple(k.shape)} {k.dtype}, "
                         f"v {tuple(v.shape)} {v.dtype}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"key/value heads must divide query heads: got H={H}, H_kv={H_kv}")
    mask_args = (0, 0, 0)
    if mask is not None:
        check_tensor("mask", mask, ndim=4, dtypes=(torch.bool,), contiguous=False)
        if mask.shape[0] not in (1, B) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (T, S):
            raise ValueError(f"mask must have shape (1 or {B}, 1, {T}, {S}), got {tuple(mask.shape)}")
        mask_args = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), mask.stride(3))
        mask = mask.view(torch.uint8)  # Triton reads bytes; same storage, no copy
    block_m, block_n = blocks or ((64, 64) if interpreting() else (128, 64))
    if min(block_m, block_n) < 16 or block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"blocks must be powers of two >= 16, got {(block_m, block_n)}")
    if blocks is None:  # do not waste a 128-row tile on a few decode queries
        block_m = max(16, min(block_m, triton.next_power_of_2(T)))
    out = torch.empty((B, H, T, d), device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(T, block_m), B * H)
    flash_attention_kernel[grid](
        out, q, k, v, mask if mask is not None else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mask_args,
        H, T, S, d, H // H_kv, math.log2(math.e) / math.sqrt(d),
        HAS_MASK=mask is not None, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **({} if interpreting() else {"num_warps": 4, "num_stages": 3}))
    return out


def attention_ref(q, k, v, mask=None, causal: bool = False) -> torch.Tensor:
    """The model's textbook attention (minillm.model.attention_ref) in float32, with this kernel's
    interface: k/v heads repeated for GQA, an optional causal rule and mask. Empty rows -> 0."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, d)
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)[None, None]       # (1, 1, T, S)
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        allowed = allowed & mask
    out = model_attention_ref(q.float(), k.float(), v.float(), allowed)              # (B, H, T, d)
    return out.nan_to_num(0.0).to(q.dtype)


def bench_flash_attention(batch: int = 4, heads: int = 16, seq: int = 4096, head_dim: int = 64,
                          dtype=torch.bfloat16) -> dict:
    """TFLOP/s of the kernel and of F.scaled_dot_product_attention, causal (half the 4*T*S*d FLOPs). GPU only."""
    require_gpu("bench_flash_attention")
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    tflops = lambda ms: 4 * batch * heads * seq * seq * head_dim * 0.5 / (ms * 1e-3) / 1e12  # noqa: E731
    ms_triton = triton.testing.do_bench(lambda: flash_attention(q, k, v, causal=True))
    ms_torch = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    return {"kernel": "flash_attention", "shape": f"{batch}x{heads}x{seq}x{head_dim} causal",
            "dtype": str(dtype).removeprefix("torch."), "triton_ms": ms_triton, "torch_ms": ms_torch,
            "triton_tflops": tflops(ms_triton), "torch_tflops": tflops(ms_torch)}
