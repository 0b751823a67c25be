"""Attention for the few query rows of a decode or verify step, as a hand-written CPU kernel
(csrc/attention.cpp), built at first use with this machine's C++ compiler.

Why a kernel of our own: in a compiled decode step (backends/compiled.py) inductor turns 1-row attention into loops
that read the whole cache, and attention over 2-16 rows into PyTorch's pieces: a batched matmul for the
scores, a softmax kernel, a second batched matmul. Each of those costs a call and a pass over memory, and
both matmuls cover every slot of the static cache, written or not. On an 8-token verify step that was the
largest part of what the step cost beyond a 1-token one (chapter 3). The kernel does the same math in one
call: it reads only the keys some row may see, scores the rows sharing a kv head together (grouped-query
attention) in registers, and splits the work over the threads as flash-decoding does (64-key chunks,
merged per row). Measured on one AVX512 CPU (Zen 4, 2 threads, bfloat16, SmolLM2's 9 query / 3 kv heads,
264 of 512 cache slots in view, one layer): the kernel alone takes 35 us for 8 rows and 17 us for 1; called
as the compiled step calls it (each compiled alone, `backends.compiled.attention_timings`), 8 rows 68 us against
107 us for inductor's matmul + softmax + matmul, 1 row 43 against 46 us for inductor's loops: on one row
the op's call from Python takes most of what the kernel saves.

    from minillm.native.attention import attention_cpu, available
    available(64, torch.bfloat16)        # None, or the one-line reason it cannot run here
    y = attention_cpu(q, k, v, mask)     # q (B, nh, T, d), k and v (B, nkv, S, d) as cached, mask (B, 1, T, S)

`model.attention_ref` is the reference (tests/test_cpu_attention.py holds them together, float32 and
bfloat16, causal and tree masks); `compile_decode(..., attention="auto")` uses the kernel where a short
measurement says it is faster than inductor's code for the model's shapes.

Results differ from attention_ref by rounding only (float32 accumulation in another order; bfloat16 outputs
rounded once). A query row's result depends on its own inputs and mask row alone, not on the other rows of
the call, so an 8-row verify step gives a token the same output as a padded 1-row step through the same
graph. A row that may see no key gets zeros where attention_ref gives NaN.

The build (build.py): `g++ -O3 -march=native -fopenmp -shared` (or $CXX), one library per head_dim, cached
under $MINILLM_KERNEL_CACHE (default ~/.cache/minillm/kernels) by a hash of the sources, the compiler, the
flags and this CPU's feature flags, so a machine never loads a library built for another CPU. No compiler, a
failed build, a head_dim that is not a multiple of 16, or a dtype other than float32/bfloat16: `available`
says which, and callers keep PyTorch's attention.
"""
from __future__ import annotations

import ctypes
import math

import torch

from . import build as native

MAX_ROWS = 128        # query rows per kv head (group x T) the kernel takes; csrc MAXR
MAX_T = 16            # query positions per call; csrc keep[16]


def build(head_dim: int) -> ctypes.CDLL:
    """Compile (once; cached) and load the kernel for `head_dim`; RuntimeError with the reason if it cannot."""
    if head_dim % 16 or not 16 <= head_dim <= 512:
        raise RuntimeError(f"the attention kernel takes head_dim a multiple of 16 in [16, 512], not {head_dim}")
    return native.load("attention.cpp", {"HD": head_dim}, setup=lambda lib: _declare(lib, head_dim))


def _declare(lib: ctypes.CDLL, head_dim: int) -> None:
    for name in ("minillm_attention_bf16", "minillm_attention_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_long] * 5 + [ctypes.c_float]
        fn.restype = ctypes.c_int
    if lib.minillm_attention_head_dim() != head_dim:
        raise RuntimeError(f"{lib._name} was built for another head_dim")


def available(head_dim: int, dtype=torch.bfloat16) -> str | None:
    """None if the kernel runs here for this head_dim and dtype (building it if needed), else why not."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the attention kernel takes float32 or bfloat16, not {dtype}"
    try:
        build(head_dim)
    except RuntimeError as e:
        return str(e)
    return None


_DTYPES = (torch.float32, torch.bfloat16)


def _check(q, k, v, mask):
    """Nothing if the kernel takes these tensors (one combined test: this runs at every call, ~1 us), else
    ValueError naming the first thing wrong (_explain)."""
    qs, ks, ms = q.shape, k.shape, mask.shape
    if (len(qs) == 4 and len(ms) == 4 and ks == v.shape and len(ks) == 4 and ks[0] == qs[0] and ks[1] == qs[1]
            and ks[3] == qs[3] and ks[2] == ms[3] and ms[1] == 1 and (ms[0] == 1 or ms[0] == qs[0])
            and mask.dtype == torch.bool and q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and 1 <= ms[2] <= MAX_T and qs[2] % ms[2] == 0 and qs[2] <= MAX_ROWS
            and q.is_cpu and k.is_cpu and v.is_cpu and mask.is_cpu):
        return
    _explain(q, k, v, mask)


def _explain(q, k, v, mask):
    if not (q.dim() == k.dim() == v.dim() == 4 and mask.dim() == 4):
        raise ValueError(f"cpu_attention takes 4-D q, k, v, mask, got {q.dim()}, {k.dim()}, {v.dim()}, {mask.dim()}")
    B, H, R, d = q.shape
    T, S = mask.shape[-2:]
    if k.shape != (B, H, S, d) or v.shape != k.shape:
        raise ValueError(f"cpu_attention: k and v must be (B, H, S, d) = {(B, H, S, d)}, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if mask.dtype != torch.bool or mask.shape[0] not in (1, B) or mask.shape[1] != 1:
        raise ValueError(f"cpu_attention: mask must be a bool (B or 1, 1, T, S) tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"cpu_attention takes float32 or bfloat16 q, k, v of one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not 1 <= T <= MAX_T or R % T or R > MAX_ROWS:
        raise ValueError(f"cpu_attention takes 1-{MAX_T} query positions and at most {MAX_ROWS} rows per kv "
                         f"head, got T={T}, {R} rows")
    if any(t.device.type != "cpu" for t in (q, k, v, mask)):
        raise ValueError("cpu_attention runs on CPU tensors only")
    raise ValueError(f"cpu_attention does not take q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                     f"mask {tuple(mask.shape)}")


def _rows_contiguous(t):
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def _cpu_attention(q, k, v, mask):
    """q (B, H, R, d): the R = group x T query rows of each kv head; k, v (B, H, S, d); mask (B or 1, 1, T, S)."""
    _check(q, k, v, mask)
    B, H, R, d = q.shape
    T, S = mask.shape[-2:]
    lib = build(d)
    q, k, v, mask = q.contiguous(), _rows_contiguous(k), _rows_contiguous(v), mask.contiguous()
    out = torch.empty_like(q)
    fn = lib.minillm_attention_bf16 if q.dtype == torch.bfloat16 else lib.minillm_attention_f32
    status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), B, H, R, T, S,
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), T * S if mask.shape[0] > 1 else 0,
                1 / math.sqrt(d))
    if status:
        raise RuntimeError(f"cpu_attention kernel returned {status} for q {tuple(q.shape)}, mask {tuple(mask.shape)}")
    return out


def _cpu_attention_shape(q, k, v, mask):
    return q.new_empty(q.shape)


# a plain library op, as backends/prepack.py's: inside a compiled graph it is one call (dynamo sees its shape from Meta)
_lib = torch.library.Library("minillm", "FRAGMENT")
_lib.define("cpu_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor")
_lib.impl("cpu_attention", _cpu_attention, "CPU")
_lib.impl("cpu_attention", _cpu_attention_shape, "Meta")
cpu_attention = torch.ops.minillm.cpu_attention.default


def attention_cpu(q, k, v, mask):
    """attention_ref's math for grouped-query attention, on the kernel: q (B, nh, T, d), k and v (B, nkv, S, d)
    as cached (not repeated per query head), mask (B or 1, 1, T, S) bool -> (B, nh, T, d)."""
    B, nh, T, d = q.shape
    nkv = k.shape[1]
    if nh % nkv:
        raise ValueError(f"attention_cpu: {nh} query heads do not share {nkv} kv heads evenly")
    out = cpu_attention(q.reshape(B, nkv, nh // nkv * T, d), k, v, mask)
    return out.view(B, nh, T, d)


attention_cpu.grouped = True   # Attention.forward hands it k and v with their nkv heads, not repeated
