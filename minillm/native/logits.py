"""The argmax and top-k of rows of logits on the CPU, as a hand-written kernel (csrc/rows.cpp): what greedy
decoding, greedy verification and Token Recycling ask of every forward's logits.

Why a kernel: PyTorch's CPU argmax and topk walk a row one scalar at a time, and a row here is SmolLM2's
49,152-token vocabulary. Measured on one AVX512 CPU (Zen 4, 2 threads): `argmax` of one bfloat16 row
~180 us, of 8 rows ~750 us (float32: 60 and 250); `topk(8)` of 8 rows ~300 us and their logsumexp 250 us
or more. A compiled bfloat16 decode step takes 10-20 ms, so a tree step's argmax, top-8 and logsumexp over
its 8 rows (tree.accept_greedy, TokenRecycling.update) cost ~1.5 ms of it, more than the extra rows of the
verify forward. The kernel reads each row in vectors of 16 in two passes (block maxima; then only the
blocks that can hold a top-k entry) and sums the exponentials in registers.

    from minillm.native.logits import argmax, topk_lse
    argmax(logits)                 # == logits.argmax(-1), the first index on ties, as torch.argmax
    values, indices, lse = topk_lse(logits, 8)    # == logits.float().topk(8) and .logsumexp(-1)

`argmax_ref` and `topk_lse_ref` are the PyTorch references (tests/test_cpu_logits.py holds them together).
argmax returns exactly torch.argmax's indices; topk_lse the same values (exact: bfloat16 -> float32 is),
the same indices up to the order of equal values, and a logsumexp within float32 rounding (its exp is a
polynomial, error ~1e-7 relative).

Where the kernel cannot serve a call, the reference does, so results never depend on it: no C++ compiler or
a failed build (`available()` says which), a dtype other than float32/bfloat16, a tensor that is not on the
CPU or needs a gradient, k above 64, or a row holding a NaN (the kernel reports it; PyTorch's answer keeps
NaN's meaning, NaN as the largest).
"""
from __future__ import annotations

import ctypes

import torch

from . import build as native

MAX_K = 64             # csrc/rows.cpp MAXK


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("minillm_top_rows_bf16", "minillm_top_rows_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    if lib.minillm_top_rows_max_k() != MAX_K:
        raise RuntimeError(f"{lib._name} takes k up to {lib.minillm_top_rows_max_k()}, not {MAX_K}")


def _lib():
    """The loaded library, or the reason (a str) it could not be had."""
    try:
        return native.load("rows.cpp", setup=_declare)
    except RuntimeError as e:
        return str(e)


def available() -> str | None:
    """None if the kernel runs here (building it if needed), else why not."""
    lib = _lib()
    return lib if isinstance(lib, str) else None


def describe() -> str:
    """Which code takes the argmax and top-k here, for benches' tables."""
    why = available()
    return "argmax/top-k on the cpu_logits kernel" if why is None else f"argmax/top-k in PyTorch ({why})"


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def topk_lse_ref(logits: torch.Tensor, k: int, lse: bool = True):
    x = logits.float()
    top = x.topk(k, dim=-1)
    return top.values, top.indices, x.logsumexp(-1) if lse else None


def _kernel(logits, k: int, lse: bool):
    """(values, indices, lse or None) from the kernel, or None where it cannot serve (module docstring)."""
    if (logits.dtype not in (torch.float32, torch.bfloat16) or logits.device.type != "cpu" or logits.dim() == 0
            or logits.requires_grad or not 1 <= k <= min(MAX_K, logits.shape[-1])):
        return None
    lib = _lib()
    if isinstance(lib, str):
        return None
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)                      # a view where the rows are evenly spaced
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < V):
        rows = rows.contiguous()
    R = rows.shape[0]
    if R == 0:
        return None
    values = torch.empty(R, k)
    indices = torch.empty(R, k, dtype=torch.long)
    sums = torch.empty(R) if lse else None
    fn = lib.minillm_top_rows_bf16 if rows.dtype == torch.bfloat16 else lib.minillm_top_rows_f32
    status = fn(rows.data_ptr(), R, V, rows.stride(0), k, values.data_ptr(), indices.data_ptr(),
                sums.data_ptr() if lse else None)
    if status == 1:                                   # a NaN: PyTorch's answer
        return None
    if status:
        raise RuntimeError(f"cpu_logits kernel returned {status} for logits {tuple(logits.shape)}, k={k}")
    lead = logits.shape[:-1]
    return values.view(*lead, k), indices.view(*lead, k), sums.view(lead) if lse else None


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> (...,) int64: torch.argmax(logits, -1), the first index on ties, on the kernel."""
    out = _kernel(logits, 1, False)
    return argmax_ref(logits) if out is None else out[1][..., 0]


def topk_lse(logits: torch.Tensor, k: int, lse: bool = True):
    """logits (..., V) -> (values float32 (..., k), indices int64 (..., k), logsumexp float32 (...) or None):
    the k largest of each row, largest first, and the row's logsumexp where lse; on the kernel."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, {logits.shape[-1]}] (the row length), got {k!r}")
    out = _kernel(logits, k, lse)
    return topk_lse_ref(logits, k, lse) if out is None else out
