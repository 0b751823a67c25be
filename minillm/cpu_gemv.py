"""A few rows of activations times a weight matrix, for bfloat16, int8 and packed int4 weights, as a hand-written CPU
kernel (csrc/gemv.cpp): the linears of a decode step (one row) and of a verify step (up to 16), which read every
weight once for those few rows.

Why a kernel of our own: a decode step's linears should run at the memory's speed, and on some CPUs PyTorch's
do not. Measured on an Intel Xeon VM (AVX512 with avx512_bf16 and AMX, 2 threads, the 120 body matmuls of
SmolLM2's 30 blocks with q/k/v and gate/up fused, weights streamed from memory, copy bandwidth ~25 GB/s):
bfloat16, oneDNN prepacked 15.1 ms (14 GB/s) against this kernel's 8.3 ms (26 GB/s); int4 g64, PyTorch's packed
kernel 5.9 ms against 3.8 ms. What the kernel does differently (csrc/gemv.cpp says how): 32 weights per
vdpbf16ps instruction, four rows at a time, and a software prefetch ahead in each row (without it: 1.4-1.6x
slower; with one stream per core the hardware prefetcher alone kept too few lines in flight).

    from minillm import cpu_gemv
    cpu_gemv.available()                          # None, or the one-line reason it cannot run here
    y = cpu_gemv.gemv_bf16(x, w)                   # == F.linear(x, w) for x (..., K), w bfloat16 (N, K)
    y = cpu_gemv.gemv_int8(x, w, scales)           # w int8 (N, K), scales float32 (N,): per-row symmetric
    y = cpu_gemv.gemv_int4(x, packed, scales, offsets, group_size)   # quant.formats' packed layout, float32 scales

Each has a reference beside it (`*_ref`: dequantize, round x to bfloat16, matmul in float32), and
tests/test_cpu_gemv.py holds them together. The kernels round x to bfloat16 (as PyTorch's packed kernels fed
bfloat16 do) but keep the weights exact: int4 and int8 values are exact in bfloat16 and float32, the products
exact in float32, the sums float32 in another order than the reference's. So they agree with the reference to
float32 rounding (relative error ~1e-6), closer than PyTorch's packed int4 kernel (~3e-3: it rounds the
dequantized weights to bfloat16).

Each row of x is summed by the same instructions in the same order whatever the number of rows, so row m of an
8-row call is bit-equal to a 1-row call on row m alone (tested): a verify step's logits can be exactly a decode
step's, which keeps speculative decoding lossless in bfloat16 and int4 (compiled.py's `consistent`, chapter 5;
trees keep a residue of their own, chapter 6). Each weight is read once for all the rows (four rows of W and four
of x at a time in registers), so a few rows cost little more than one while the kernel waits on memory; past that
it is bound by its instructions (Xeon VM, bfloat16, the 30 blocks' linears streamed: 1 / 2 / 8 rows 8.5 / 8.7 /
14.9 ms, oneDNN 18-19 at each), and the layers measure where it still pays.

Who uses them: `QuantLinear` (quant/formats.py) and `PackedLinear` (prepack.py) measure, once per weight shape
and thread count, this kernel against theirs at widths 1, 2, 4, 8 and 16 (`rows_paying`), and run inputs up to
the widest width where it paid on it; `repr` says up to how many rows (`1-16 rows: gemv`). Wider inputs (prefill)
keep PyTorch's kernels. The kernels are ops of
PyTorch's dispatcher (`torch.ops.minillm.gemv_*`, registered in C++: the library is built against PyTorch's
headers), so a compiled decode step calls each as one op, for ~2 us (the same op with a Python body cost ~10 us
more a call, more than the kernel saved on int4).

Needs AVX512-BF16: on a CPU without it (or without a C++ compiler) `available()` says why and nothing changes.
"""
from __future__ import annotations

import torch

from . import native
from .timing import median_seconds

# The one-row kernel is kept where it measures at most this much slower than the layer's own, weights in cache: a
# decode step streams its weights from memory, where the kernel's prefetching gains most, and in cache the int4
# kernels measure about even (Xeon VM: 30 blocks' int4 weights streamed 4.3 ms against 5.9-6.3; in cache a tie).
TOLERANCE = 0.1


def _setup(lib) -> None:
    if not lib.minillm_gemv_available():
        raise RuntimeError("the gemv kernel needs AVX512-BF16 instructions, which this CPU (or compiler) lacks")


def _lib():
    """The loaded library (its ops registered), or the reason (a str) it could not be had."""
    try:
        return native.load("gemv.cpp", setup=_setup, with_torch=True)
    except RuntimeError as e:
        return str(e)


def available() -> str | None:
    """None if the kernels run here (building them if needed), else why not."""
    lib = _lib()
    return lib if isinstance(lib, str) else None


_OPS: dict = {}      # name -> the op, once the library is loaded (each eager call then skips the checks)


def _op(name: str):
    if name not in _OPS:
        why = available()
        if why:
            raise RuntimeError(f"cpu_gemv.{name}: {why}")
        _OPS[name] = getattr(torch.ops.minillm, name).default
    return _OPS[name]


def gemv_bf16(x, w):
    """x (..., K) float32 or bfloat16, a few rows; w bfloat16 (N, K) -> (..., N) in x's dtype: F.linear(x, w)."""
    return _op("gemv_bf16")(x, w)


def gemv_int8(x, w, scales):
    """w int8 (N, K), scales float32 (N,): x @ (w * scales[:, None]).T."""
    return _op("gemv_int8")(x, w, scales)


def gemv_int4(x, packed, scales, offsets, group_size: int):
    """packed uint8 (N, K / 2) in quant.formats' layout, scales and offsets float32 (N, K / group_size)."""
    return _op("gemv_int4")(x, packed, scales, offsets, group_size)


# The widths a caller measures the kernel at (a decode step's one row, the compiled verify widths of chapters 5-6),
# and the most rows it is ever given: beyond that the weights are worth packing for a real matmul kernel.
WIDTHS = (1, 2, 4, 8, 16)
MAX_ROWS = WIDTHS[-1]


def pays(gemv, other: str, kernel, repeats: int = 9):
    """(whether to run one row on the kernel, {"gemv": ms, other: ms}): both calls timed in turns, three rounds,
    each keeping its best median; the kernel kept unless more than TOLERANCE slower."""
    calls = {"gemv": gemv, other: kernel}
    times = {k: [] for k in calls}
    for _ in range(3):
        for k, call in calls.items():
            times[k].append(1e3 * median_seconds(call, repeats))
    best = {k: round(min(v), 4) for k, v in times.items()}
    return best["gemv"] <= (1 + TOLERANCE) * best[other], best


def rows_paying(gemv, other: str, kernel, make_x, widths=WIDTHS):
    """(the most rows of x to run on the kernel: the widest of `widths` up to which it paid at every width, 0 where
    it did not pay on one row; {width: {"gemv": ms, other: ms}}). gemv and kernel take x = make_x(width)."""
    rows, times = 0, {}
    for width in widths:
        x = make_x(width)
        ok, times[width] = pays(lambda: gemv(x), other, lambda: kernel(x))
        if not ok:
            break
        rows = width
    return rows, times


def describe(rows: int) -> str:
    """What repr says of a layer taking up to `rows` rows on the kernel: "", ", 1 row: gemv", ", 1-16 rows: gemv"."""
    return "" if rows <= 0 else ", 1 row: gemv" if rows == 1 else f", 1-{rows} rows: gemv"


def gemv_bf16_ref(x, w):
    return (x.to(torch.bfloat16).float() @ w.float().t()).to(x.dtype)


def gemv_int8_ref(x, w, scales):
    return (x.float() @ w.float().t() * scales).to(x.dtype)


def gemv_int4_ref(x, packed, scales, offsets, group_size: int):
    """Unpack (byte j: column 2j low nibble, 2j + 1 high), dequantize group by group, matmul."""
    N = packed.shape[0]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(N, -1, group_size).float()     # (N, G, g)
    w = (q * scales.float()[..., None] + offsets.float()[..., None]).reshape(N, -1)
    return (x.to(torch.bfloat16).float() @ w.t()).to(x.dtype)
