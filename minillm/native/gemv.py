"""A few rows of activations times a weight matrix, for bfloat16, int8 and packed int4 weights, as a hand-written CPU
kernel (csrc/gemv.cpp): the linears of a decode step (one row) and of a verify step (up to 16), which read every
weight once for those few rows.

Why a kernel of our own: a decode step's linears should run at the memory's speed, and on some CPUs PyTorch's do
not (chapter 3 measures both). csrc/gemv.cpp says how it keeps up: 32 weights per vdpbf16ps instruction, four rows
at a time, and a software prefetch ahead in each row.

    from minillm.native import gemv
    gemv.available()                          # None, or the one-line reason it cannot run here
    y = gemv.gemv_bf16(x, w)                  # == F.linear(x, w) for x (..., K), w bfloat16 (N, K)
    y = gemv.gemv_int8(x, w, scales)          # w int8 (N, K), scales float32 (N,): per-row symmetric
    y = gemv.gemv_int4(x, packed, scales, offsets, group_size)   # quant.formats' packed layout, float32 scales

Each has a reference beside it (`*_ref`: dequantize, round x to bfloat16, matmul in float32), and
tests/test_cpu_gemv.py holds them together. The kernels round x to bfloat16 (as PyTorch's packed kernels fed
bfloat16 do) but keep the weights exact, so they agree with the reference to float32 rounding, closer than
PyTorch's packed int4 kernel (which rounds the dequantized weights to bfloat16).

Each row of x is summed by the same instructions in the same order whatever the number of rows, so row m of an
8-row call is bit-equal to a 1-row call on row m alone (tested): a verify step's logits can be exactly a decode
step's, which keeps speculative decoding lossless in bfloat16 and int4 (backends/compiled.py's `consistent`).
Each weight is read once for all the rows, so a few rows cost little more than one while the kernel waits on
memory; past that it is bound by its instructions, and the layers measure where it still pays.

Who uses them: `QuantLinear` (quant/formats.py) and `PackedLinear` (backends/prepack.py) measure, once per weight
shape and thread count, this kernel (and the tile variant below, where it runs) against theirs at widths 1-16
(`choose`) and run inputs up to the widest width where it paid; `repr` says which (`1-16 rows: gemv`). Wider
inputs (prefill) keep PyTorch's kernels. The kernels are ops of PyTorch's dispatcher (`torch.ops.minillm.gemv_*`,
registered in C++), so a compiled decode step calls each as one op.

Needs AVX512-BF16: on a CPU without it (or without a C++ compiler) `available()` says why and nothing changes.

The tile variant (csrc/tiles.cpp), where the CPU has AMX (Intel Xeon since Sapphire Rapids; not AMD Zen 4):
TDPBF16PS multiplies up to 16 rows of x by a 32 x 16 tile of weights in one instruction, so up to 16 rows cost
about what one does. The weights are repacked once into the tile layout (`pack_tiles_*`: plain reshapes), int8
and int4 turned into exact bfloat16 tiles in L1 as they stream by:

    gemv.tiles_available()       # None, or why not (no AMX, no compiler support, the OS says no, MINILLM_TILES=0)
    y = gemv.tiles_bf16(x, gemv.pack_tiles_bf16(w))              # x at most 16 rows
    y = gemv.tiles_int8(x, gemv.pack_tiles_int8(w), scales)
    y = gemv.tiles_int4(x, *gemv.pack_tiles_int4(packed, scales, offsets), group_size)

Same references, same rule (row m of an M-row call bit-equal to a one-row call, tested), not the same bits as
the gemv kernels (another summation order; tiles_int8 rounds x to bfloat16). Layers choose between the two
(`choose`: the one paying up to more rows, then the faster); gemv="tiles" asks for it.
"""
from __future__ import annotations

import os
import platform

import torch

from ..timing import median_seconds
from . import build as native

# The one-row kernel is kept where it measures at most this much slower than the layer's own with the weights in
# cache: a decode step streams its weights from memory, where the kernel's prefetching gains most.
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


def _op(name: str, why_not=None):
    """torch.ops.minillm.<name>, once its library (gemv's, or the tiles' with why_not=tiles_available) runs here."""
    if name not in _OPS:
        why = (why_not or available)()
        if why:
            raise RuntimeError(f"minillm.native.gemv.{name}: {why}")
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
KERNELS = ("gemv", "tiles")     # gemv.cpp's (AVX512-BF16) and tiles.cpp's (AMX), below


def choose(calls: dict, other: str, kernel, make_x, widths=WIDTHS, repeats: int = 9):
    """(a plan: which of `calls` ({"gemv": call, "tiles": call}, those that run here) to run at which widths,
    {width: {name: ms, ..., other: ms}}). At each width, widest last, every call and the layer's own kernel are
    timed in turns (three rounds, best medians); the fastest call is kept where it is no more than TOLERANCE
    slower than the kernel, and the measuring stops at the first width where none is. The plan is
    ((up to rows, name), ...), neighbouring widths on one kernel merged: ((1, "gemv"), (16, "tiles")) runs one row
    on gemv and 2-16 on the tiles; () where none paid on one row."""
    plan, times = [], {}
    for width in widths:
        x = make_x(width)
        runs = {name: [] for name in (*calls, other)}
        for _ in range(3):
            for name in runs:
                call = kernel if name == other else calls[name]
                runs[name].append(1e3 * median_seconds(lambda: call(x), repeats))
        times[width] = {name: round(min(ms), 4) for name, ms in runs.items()}
        best = min(calls, key=lambda n: times[width][n])
        if times[width][best] > (1 + TOLERANCE) * times[width][other]:
            break
        if plan and plan[-1][1] == best:
            plan[-1] = (width, best)
        else:
            plan.append((width, best))
    return tuple(plan), times


def fastest(calls: dict, make_x, widths=(1, 8), repeats: int = 9):
    """(the few-row kernel of `calls` that ran one row and `widths[-1]` rows fastest together, {name: ms}): what a
    layer runs at every width up to MAX_ROWS (compile_decode(consistent=True))."""
    xs = [make_x(w) for w in widths]
    times = {name: round(sum(1e3 * median_seconds(lambda: call(x), repeats) for x in xs), 4) for name, call in calls.items()}
    return min(times, key=times.get), times


def every_width(gemv, calls: dict, make_x) -> tuple:
    """The plan for gemv=True (the faster of `calls` over 1 and 8 rows: fastest) or gemv="gemv" / "tiles" (that
    one), at every width up to MAX_ROWS; () where the kernel asked for is not among `calls` (none runs here)."""
    if gemv in KERNELS:
        calls = {gemv: calls[gemv]} if gemv in calls else {}
    if not calls:
        return ()
    kernel = fastest(calls, make_x)[0] if len(calls) > 1 else next(iter(calls))
    return ((MAX_ROWS, kernel),)


def kernel_for(plan: tuple, rows: int) -> str | None:
    """Which kernel of `plan` (choose's) runs an input of `rows` rows: None where the plan ends below it."""
    for up_to, name in plan:
        if rows <= up_to:
            return name
    return None


def describe(plan: tuple) -> str:
    """What repr says of a layer running `plan` (choose's): "", ", 1-16 rows: tiles", ", 1 row: gemv, 2-16 rows: tiles"."""
    parts, low = [], 1
    for up_to, name in plan:
        parts.append(f"{low} row{'s' * (up_to > 1)}: {name}" if up_to == low else f"{low}-{up_to} rows: {name}")
        low = up_to + 1
    return "".join(", " + p for p in parts)


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


# --- the tile variant (csrc/tiles.cpp): AMX, up to 16 rows for the cost of one -----------------------------------

def _setup_tiles(lib) -> None:
    if not lib.minillm_tiles_available():
        raise RuntimeError("the tile kernel needs AMX-BF16, which this CPU (or its compiler, or the OS) does not give")


# MINILLM_TILES=emulate: the tile kernels built on csrc/amx_emulate.h's plain C++ tiles (ops tiles_emulated_*), so
# their logic runs where the CPU has no AMX: how tests/test_cpu_tiles.py checks them on every CPU with AVX512-BF16.
# Read at import; slow by design (a scalar loop per tile instruction), never a choice for speed.
EMULATED = os.environ.get("MINILLM_TILES") == "emulate"
TILES_DEFINES = {"MINILLM_TILES_EMULATE": 1} if EMULATED else {}


def tiles_op_name(kind: str) -> str:
    """The registered name of a tile op ("bf16", "int8", "int4"): tiles_<kind>, or tiles_emulated_<kind>."""
    return f"tiles_emulated_{kind}" if EMULATED else f"tiles_{kind}"


def tiles_available() -> str | None:
    """None if the AMX tile kernels run here (building them if needed), else why not."""
    if os.environ.get("MINILLM_TILES") == "0":
        return "the tile kernel is switched off (MINILLM_TILES=0)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the tile kernel needs an x86-64 CPU with AMX, not {platform.machine()}"
    why = available() if EMULATED else None
    if why:
        return f"emulated tiles still need the gemv kernel's AVX512-BF16: {why}"
    try:
        native.load("tiles.cpp", TILES_DEFINES, setup=_setup_tiles, with_torch=True)
    except RuntimeError as e:
        return str(e)
    return None


def pack_tiles_bf16(w):
    """w (N, K) -> the tile layout (N / 16, K / 32, 16, 32): per block of 16 outputs and chunk of 32 inputs, tile
    row kk holds for each output n its inputs 2kk and 2kk + 1. Works for int8 weights alike (pack_tiles_int8)."""
    N, K = w.shape
    if N % 16 or K % 32:
        raise ValueError(f"the tile kernel takes out_features a multiple of 16 and in_features of 32, got {N}, {K}")
    return w.reshape(N // 16, 16, K // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(N // 16, K // 32, 16, 32).contiguous()


pack_tiles_int8 = pack_tiles_bf16


def pack_tiles_int4(packed, scales, offsets):
    """quant.formats' packed int4 (N, K / 2) (byte j: inputs 2j and 2j + 1), scales and offsets (N, G) -> the tile
    layout (N / 16, K / 32, 16, 16): per block of 16 outputs and chunk of 32 inputs, four groups of four tile rows,
    each group 16 outputs x 4 rows, byte (n, r) holding output n's inputs 2kk and 2kk + 1 (kk = 4 group + r) as
    it was (csrc/tiles.cpp's int4_tile says why); scales and offsets float32 (N / 16, G, 16)."""
    N, K = packed.shape[0], 2 * packed.shape[1]
    if N % 16 or K % 32:
        raise ValueError(f"the tile kernel takes out_features a multiple of 16 and in_features of 32, got {N}, {K}")
    q = packed.reshape(N // 16, 16, K // 32, 4, 4).permute(0, 2, 3, 1, 4).reshape(N // 16, K // 32, 16, 16).contiguous()
    blocks = [t.float().reshape(N // 16, 16, -1).transpose(1, 2).contiguous() for t in (scales, offsets)]
    return q, *blocks


def tiles_bf16(x, wt):
    """x (..., K), at most 16 rows; wt = pack_tiles_bf16(w): F.linear(x, w)."""
    return _op(tiles_op_name("bf16"), tiles_available)(x, wt)


def tiles_int8(x, wt, scales):
    """wt = pack_tiles_int8(w), w int8 (N, K), scales float32 (N,): x @ (w * scales[:, None]).T, x rounded to bfloat16
    (the tiles multiply bfloat16; gemv_int8 keeps x in float32)."""
    return _op(tiles_op_name("int8"), tiles_available)(x, wt, scales)


def tiles_int4(x, wt, scales, offsets, group_size: int):
    """wt, scales, offsets = pack_tiles_int4(packed, scales, offsets): gemv_int4's answer."""
    return _op(tiles_op_name("int4"), tiles_available)(x, wt, scales, offsets, group_size)


def tiles_unavailable(out_features: int, in_features: int, group_size: int | None = None) -> str | None:
    """None if the tile kernels take a layer of this shape here, else why not."""
    if out_features % 16 or in_features % 32 or (group_size is not None and (group_size % 32 or in_features % group_size)):
        return (f"the tile kernel takes out_features a multiple of 16, in_features of 32 (and group sizes of 32 "
                f"dividing it), not {out_features}, {in_features}" + (f", {group_size}" if group_size else ""))
    return tiles_available()
