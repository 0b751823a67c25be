"""Number formats of weight-only quantization: group-wise scales, RTN, int4 packing, the quantized
Linear modules and the handler that swaps them in. GPTQ and AWQ (gptq.py, awq.py) choose the
integers more cleverly but store them in these same formats; quant/__init__.py dispatches.

A weight matrix W (N out, K in) is cut along K into groups of `group_size` columns; each
(row, group) gets a float scale and offset and each weight becomes a small unsigned integer q:

    W[n, k] ~= scales[n, k // g] * q[n, k] + offsets[n, k // g]      q in [0, 2**bits - 1]

asymmetric (zero-point): offset = group min, scale = (max - min) / (2**bits - 1)   (GGUF's Q4_1)
symmetric  (absmax):     scale = absmax / (2**(bits-1) - 1), offset = -2**(bits-1) * scale
                         (int4: q - 8 in [-7, 7], offsets = -8 * scales; int8: q - 128 in [-127, 127])
Per-channel is group_size = K; per-tensor is W.reshape(1, -1) with one group.
K % group_size != 0 is refused with a ValueError (no padding). SmolLM2's widths 576 and 1536 are multiples of
64 (and 32, 192) but 576 = 4.5 x 128, so the usual "g128" is g64 here.

THE PACKED INT4 LAYOUT (shared with the Triton chapter's int4 decode kernel):
    packed  uint8 (N, K // 2): byte j of a row holds column 2j in its low nibble, column 2j + 1 in its high nibble
    scales  float16 (N, K // g), offsets float16 (N, K // g)
    W[n, k] = scales[n, k//g] * q[n, k] + offsets[n, k//g], computed in float32 (group_params rounds the
    scales and offsets to float16 values before q is chosen, so half-precision storage loses nothing more)
GGUF's Q4_1 orders nibbles differently (in each 32-value block, byte j holds value j low and j + 16 high);
see model/loading.py and notebook 03.

Forwards: `Int4Linear`/`Int8Linear` each have a reference forward (dequantize, then an ordinary matmul)
and a packed one calling PyTorch's CPU kernels (`aten._weight_int4pack_mm_for_cpu`, whose own
converted weight layout is kept beside ours, and `aten._weight_int8pack_mm`). Those kernels are
vectorized for bfloat16 activations and run scalar code fed float32 (chapter 3 measures it), so the packed
forward casts activations to `act_dtype` (bfloat16 by default) and back, and impl="auto" (the default) measures
ref, packed/bfloat16 and packed/float32 once per shape on this machine and keeps the fastest: `repr(module)` and
`kernels_used(model)` say which runs. Inputs of a few rows (decode and verify steps) can run on one of
native/gemv.py's kernels instead ("gemv", and "tiles" where the CPU has AMX); "auto" measures them too, at widths
1 to 16 (`_choose_gemv`, `GEMV_CHOICES`), and `repr` says which and up to how many rows (`1-16 rows: tiles`).
The embedding and the tied output head can be quantized too: `quantize(..., head="int8")` gives the
head its own Int8Linear (in float32 the head is a fifth of SmolLM2's bytes, read at every decode step).

Not handled: activation quantization (int8 x int8 matmuls), fp8/NF4, a quantized embedding table (its
lookup reads one row a token, so only its size would shrink).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..native import gemv as cpu_gemv
from ..timing import median_seconds

DEFAULT_IMPL = "auto"  # measured at load: see QuantLinear


def check_groups(w: torch.Tensor, group_size: int) -> int:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if group_size < 1 or w.shape[1] % group_size:
        raise ValueError(f"group_size must divide the input width: width {w.shape[1]} is not a multiple of "
                         f"group_size {group_size} (pad the weight or pick a divisor)")
    return w.shape[1] // group_size


def group_params(w: torch.Tensor, bits: int, symmetric: bool):
    """w (N, g) one group per row -> scales (N,), offsets (N,) such that w ~= scales * q + offsets.

    Both are rounded to float16 values (stored as float16, like GGUF's and GPTQ's scales), and q is
    then computed with the rounded values, so storing them in half precision loses nothing more.
    """
    if symmetric:
        scales = _to_half_values(w.abs().amax(-1) / (2 ** (bits - 1) - 1))
        return scales, -(2 ** (bits - 1)) * scales
    lo, hi = w.amin(-1), w.amax(-1)
    return _to_half_values((hi - lo) / (2 ** bits - 1)), lo.half().to(w.dtype)


def _to_half_values(scales):
    """Round to float16 values; a zero (or underflowing) scale, from a constant group, becomes the smallest normal one."""
    scales = scales.half().to(scales.dtype)
    return torch.where(scales == 0, torch.full_like(scales, 2.0 ** -14), scales)


def quantize_with(w, scales, offsets, bits: int) -> torch.Tensor:
    """Round each w to its nearest level: q = clamp(round((w - offset) / scale), 0, 2**bits - 1)."""
    return torch.clamp(torch.round((w - offsets) / scales), 0, 2 ** bits - 1)


def quantize_groups(w: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = False):
    """Round-to-nearest, group-wise: w (N, K) -> q uint8 (N, K), scales (N, K//g), offsets (N, K//g)."""
    n_groups = check_groups(w, group_size)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    w = w if w.dtype == torch.float64 else w.float()                          # float64 stays (GPTQ tests)
    wg = w.reshape(w.shape[0], n_groups, group_size)                         # (N, G, g)
    scales, offsets = group_params(wg, bits, symmetric)                       # (N, G) each
    q = quantize_with(wg, scales[..., None], offsets[..., None], bits)       # (N, G, g)
    return q.reshape(w.shape).to(torch.uint8), scales, offsets


def quantize_groups_ref(w: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = False):
    """The same as quantize_groups with plain loops over rows and groups (slow; for tests)."""
    def half_or_tiny(x):
        x = x.half().float()
        return x if x > 0 else torch.tensor(2.0 ** -14)

    N, K = w.shape
    check_groups(w, group_size)
    q = torch.zeros(N, K, dtype=torch.uint8)
    scales, offsets = torch.zeros(N, K // group_size), torch.zeros(N, K // group_size)
    for n in range(N):
        for gi in range(K // group_size):
            group = w[n, gi * group_size:(gi + 1) * group_size].float()
            if symmetric:
                scale = half_or_tiny(group.abs().max() / (2 ** (bits - 1) - 1))
                offset = -(2 ** (bits - 1)) * scale
            else:
                scale = half_or_tiny((group.max() - group.min()) / (2 ** bits - 1))
                offset = group.min().half().float()
            for j, value in enumerate(group):
                level = torch.round((value - offset) / scale).clamp(0, 2 ** bits - 1)
                q[n, gi * group_size + j] = int(level)
            scales[n, gi], offsets[n, gi] = scale, offset
    return q, scales, offsets


def dequantize_groups(q, scales, offsets) -> torch.Tensor:
    """q (N, K), scales/offsets (N, G) -> float W (N, K) = scales * q + offsets, group by group."""
    N, K = q.shape
    G = scales.shape[1]
    dtype = torch.float64 if scales.dtype == torch.float64 else torch.float32    # half scales: compute in float32
    w = q.reshape(N, G, K // G).to(dtype) * scales[..., None].to(dtype) + offsets[..., None].to(dtype)  # (N, G, g)
    return w.reshape(N, K)


def fake_quantize(w, bits: int = 4, group_size: int = 32, symmetric: bool = False) -> torch.Tensor:
    """Quantize then dequantize: the float weights an RTN-quantized layer actually computes with."""
    return dequantize_groups(*quantize_groups(w, bits, group_size, symmetric)).to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) ints in [0, 15], K even -> uint8 (N, K//2). Row [1, 2, 3, 4] -> bytes [0x21, 0x43]."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"int4 values must be in [0, 15], got range [{int(q.min())}, {int(q.max())}]")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K//2) -> q uint8 (N, K); inverse of pack_int4."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


PACKED_INT4_GROUPS = (32, 64, 128, 256)   # the group sizes aten._weight_int4pack_mm_for_cpu takes
IMPLS = ("ref", "packed", "auto")
# Which forward each shape chose on this machine: (class, out, in, group, threads) -> (impl, act_dtype, times)
KERNEL_CHOICES: dict = {}
# Which few-row kernel at which widths: (class, out, in, group, impl, threads) -> (plan, {width: {"gemv": ms, "tiles": ms, "kernel": ms}})
GEMV_CHOICES: dict = {}
GEMV_DTYPES = (torch.float32, torch.bfloat16)


class QuantLinear(nn.Module):
    """What Int4Linear and Int8Linear share: a reference forward (dequantize, then an ordinary matmul),
    a packed one (PyTorch's CPU kernel, fed activations of `act_dtype`) and `impl` choosing between them.

    impl "auto" (the default) measures, once per weight shape and thread count, the reference and
    the packed kernel with bfloat16 and with float32 activations on 1 and 8 rows, and keeps the
    fastest; `KERNEL_CHOICES` and `repr` show what was chosen. The packed kernels are vectorized for
    bfloat16 activations: fed float32 they fall back to scalar code, about 9-30x slower (notebook 03).
    """
    impl: str = "ref"
    act_dtype: torch.dtype = torch.float32

    def forward_ref(self, x):
        return F.linear(x, self.dequantize().to(x.dtype))

    def forward_packed(self, x):
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)
        y = self._packed_mm(x2, self.act_dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    matvec_fn = None  # a kernel (module, x) for one-token inputs (chapter 7's int4_matvec); None: below
    # which of cpu_gemv's kernels ("gemv": AVX512-BF16, "tiles": AMX) runs inputs of how many rows (set by set_impl):
    # ((up to rows, kernel), ...), e.g. ((1, "gemv"), (16, "tiles")); () for none
    gemv_plan: tuple = ()

    @property
    def gemv_rows(self) -> int:
        """Up to how many rows inputs run on cpu_gemv's kernels (0: none)."""
        return self.gemv_plan[-1][0] if self.gemv_plan else 0

    @property
    def gemv(self) -> bool:
        return bool(self.gemv_plan)

    def forward(self, x):
        rows = x.shape[:-1].numel()
        if self.matvec_fn is not None and rows == 1:
            return self.matvec_fn(self, x)
        if 0 < rows <= self.gemv_rows and x.device.type == "cpu" and x.dtype in GEMV_DTYPES:
            return self.forward_gemv(x)
        if self.impl == "packed" and x.device.type == "cpu":  # the packed kernels are CPU ones
            return self.forward_packed(x)
        return self.forward_ref(x)

    def set_impl(self, impl: str, act_dtype: torch.dtype | None = None, gemv=None):
        """"ref" | "packed" (activations cast to act_dtype, default bfloat16) | "auto" (measure, keep the fastest).
        gemv: inputs of a few rows (a decode step, a verify step) on one of cpu_gemv's kernels: True (up to
        cpu_gemv.MAX_ROWS rows, on the one measured faster here), "gemv" or "tiles" (up to MAX_ROWS on that one),
        False, or "auto" (the kernel and width measured to pay; see _choose_gemv); None (the default): "auto" with
        impl "auto", else False."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if act_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"act_dtype must be torch.float32 or torch.bfloat16, got {act_dtype!r}")
        if gemv not in (None, True, False, "auto", *cpu_gemv.KERNELS):
            raise ValueError(f"gemv must be True, False, 'auto', None or one of {cpu_gemv.KERNELS}, got {gemv!r}")
        gemv = ("auto" if impl == "auto" else False) if gemv is None else gemv
        if impl == "auto":
            impl, act_dtype = self._choose()
        elif impl == "packed":
            self._check_packed()
            act_dtype = act_dtype or torch.bfloat16
        self.impl, self.act_dtype = impl, act_dtype or torch.float32
        self.gemv_plan = ()
        if gemv is True or gemv in cpu_gemv.KERNELS:
            self.gemv_plan = cpu_gemv.every_width(gemv, self._few_row_calls(), self._random_rows)
            if not self.gemv_plan:
                why = {"gemv": self._gemv_unavailable(), "tiles": self._tiles_unavailable()}
                why = "; ".join(w for k, w in why.items() if gemv in (True, k))
                raise ValueError(f"{type(self).__name__}(in={self.in_features}, out={self.out_features}): {why}")
        elif gemv == "auto":
            self.gemv_plan = self._choose_gemv()
        self._drop_tiles_unless_used()
        return self

    def _prepare_gemv(self):
        """Whatever the gemv kernel reads beside the module's own buffers, made once (before any compiled graph sees it)."""

    def _prepare_tiles(self):
        """The weights in the tile layout (cpu_gemv.pack_tiles_*), made once."""
        raise NotImplementedError

    def _gemv_unavailable(self) -> str | None:
        """None if cpu_gemv's gemv kernel takes this layer here, else why not."""
        return cpu_gemv.available()

    def _tiles_unavailable(self) -> str | None:
        """None if cpu_gemv's tile kernel takes this layer here, else why not."""
        return cpu_gemv.tiles_unavailable(self.out_features, self.in_features, getattr(self, "group_size", None))

    def _few_row_calls(self) -> dict:
        """{"gemv": call, "tiles": call}: the few-row kernels that take this layer here, their inputs prepared."""
        calls = {}
        if self._gemv_unavailable() is None:
            self._prepare_gemv()
            calls["gemv"] = self._forward_gemv
        if self._tiles_unavailable() is None:
            self._prepare_tiles()
            calls["tiles"] = self._forward_tiles
        return calls

    def _drop_tiles_unless_used(self):
        if "tiles" not in dict(self.gemv_plan).values():
            for name in [n for n in self._buffers if n.startswith("tiles_")]:
                del self._buffers[name]

    def forward_gemv(self, x):
        """x (a few rows) on the few-row kernel the plan names for its rows (gemv, where the plan names none)."""
        if cpu_gemv.kernel_for(self.gemv_plan, x.shape[:-1].numel()) == "tiles":
            return self._forward_tiles(x)
        return self._forward_gemv(x)

    def _forward_gemv(self, x):
        raise NotImplementedError

    def _forward_tiles(self, x):
        raise NotImplementedError

    def _random_rows(self, rows: int):
        return torch.randn(rows, self.in_features, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def _choose_gemv(self) -> tuple:
        """Which few-row kernel inputs of each width should run on (a plan, cpu_gemv.choose's): measured once per
        shape and thread count against the layer's own kernel at cpu_gemv.WIDTHS, the fastest kept at each width
        unless more than cpu_gemv.TOLERANCE slower than the layer's own; () where none paid."""
        calls = self._few_row_calls()
        if not calls:
            return ()
        key = (type(self).__name__, self.out_features, self.in_features, getattr(self, "group_size", None),
               self.impl, torch.get_num_threads())
        if key not in GEMV_CHOICES:
            self.gemv_plan = ()                                # self(x): the layer's own kernel
            GEMV_CHOICES[key] = cpu_gemv.choose(calls, "kernel", self, self._random_rows)
        return GEMV_CHOICES[key][0]

    def _check_packed(self):
        pass

    @torch.no_grad()
    def _choose(self, rows=(1, 8), repeats: int = 7):
        key = (type(self).__name__, self.out_features, self.in_features, getattr(self, "group_size", None),
               torch.get_num_threads())
        if key not in KERNEL_CHOICES:
            times = {}
            for impl, act in (("ref", torch.float32), ("packed", torch.bfloat16), ("packed", torch.float32)):
                self.impl, self.act_dtype = impl, act
                try:
                    times[(impl, act)] = sum(_median_ms(self, torch.randn(r, self.in_features), repeats) for r in rows)
                except (RuntimeError, ValueError, NotImplementedError):  # no such kernel on this CPU / group size
                    continue
            best = min(times, key=times.get)
            KERNEL_CHOICES[key] = (*best, {f"{i}/{str(a)[6:]}": round(t, 4) for (i, a), t in times.items()})
        return KERNEL_CHOICES[key][:2]

    def _apply(self, fn, recurse=True):
        """model.to(device) moves the buffers; model.bfloat16() leaves their dtypes alone (a float16
        scale cast to bfloat16 would lose bits the integers were rounded against)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def kernel(self) -> str:
        name = "ref" if self.impl == "ref" else f"packed/{str(self.act_dtype)[6:]}"
        return name + cpu_gemv.describe(self.gemv_plan)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel()}"


def _median_ms(module, x, repeats):
    """Median milliseconds of module(x), after one untimed call (which also raises, if the kernel cannot run)."""
    return 1e3 * median_seconds(lambda: module(x), repeats)


class Int4Linear(QuantLinear):
    """A Linear whose weight is stored packed, 4 bits per value plus a scale and offset per group."""

    def __init__(self, packed, scales, offsets, group_size: int, impl: str = "auto", act_dtype=None):
        super().__init__()
        N, half_k = packed.shape
        if scales.shape != (N, 2 * half_k // group_size) or offsets.shape != scales.shape:
            raise ValueError(f"scales/offsets must have shape {(N, 2 * half_k // group_size)}, "
                             f"got {tuple(scales.shape)} and {tuple(offsets.shape)}")
        self.in_features, self.out_features, self.group_size = 2 * half_k, N, group_size
        self.register_buffer("packed", packed.to(torch.uint8))
        self.register_buffer("scales", scales.half())    # exact: group_params rounds them to float16 values
        self.register_buffer("offsets", offsets.half())
        if group_size in PACKED_INT4_GROUPS:
            self._pack_for_aten()
        self.set_impl(impl, act_dtype)

    def _pack_for_aten(self):
        """PyTorch's own int4 layout, beside ours: int32 q (N, K) converted by aten, and (K//g, N, 2)
        [scale, zero] with w = (q - 8) * scale + zero, for each activation dtype; N padded to a multiple of 16."""
        pad = -self.out_features % 16
        q = F.pad(unpack_int4(self.packed).to(torch.int32), (0, 0, 0, pad))
        scales, offsets = F.pad(self.scales.float(), (0, 0, 0, pad)), F.pad(self.offsets.float(), (0, 0, 0, pad))
        scales_and_zeros = torch.stack([scales.t(), (offsets + 8 * scales).t()], dim=-1).contiguous()
        self.register_buffer("aten_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("aten_sz_float32", scales_and_zeros, persistent=False)
        self.register_buffer("aten_sz_bfloat16", scales_and_zeros.bfloat16(), persistent=False)

    def _gemv_unavailable(self) -> str | None:
        g, K = self.group_size, self.in_features
        if K % 64 or not (g == 32 or g % 64 == 0):
            return f"the gemv kernel takes in_features a multiple of 64 and group size 32 or a multiple of 64, not {K}, {g}"
        return cpu_gemv.available()

    def _prepare_gemv(self):
        if "gemv_scales" not in self._buffers:        # float32 copies of the scales and offsets, for the kernel
            self.register_buffer("gemv_scales", self.scales.float(), persistent=False)
            self.register_buffer("gemv_offsets", self.offsets.float(), persistent=False)

    def _forward_gemv(self, x):
        self._prepare_gemv()
        return cpu_gemv.gemv_int4(x, self.packed, self.gemv_scales, self.gemv_offsets, self.group_size)

    def _prepare_tiles(self):
        if "tiles_q" not in self._buffers:
            for name, t in zip(("tiles_q", "tiles_scales", "tiles_offsets"),
                               cpu_gemv.pack_tiles_int4(self.packed, self.scales, self.offsets)):
                self.register_buffer(name, t, persistent=False)

    def _forward_tiles(self, x):
        self._prepare_tiles()
        return cpu_gemv.tiles_int4(x, self.tiles_q, self.tiles_scales, self.tiles_offsets, self.group_size)

    def _check_packed(self):
        if self.group_size not in PACKED_INT4_GROUPS:
            raise ValueError(f"the packed int4 kernel takes group sizes {PACKED_INT4_GROUPS}, not {self.group_size}; "
                             f"use impl='ref' or 'auto'")

    @classmethod
    def from_quantized(cls, q, scales, offsets, group_size=None, **kw):
        group_size = group_size or q.shape[1] // scales.shape[1]
        return cls(pack_int4(q), scales, offsets, group_size, **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True, **kw):
        if linear.bias is not None:
            raise ValueError("Int4Linear has no bias; SmolLM2's linears have none")
        q, scales, offsets = quantize_groups(linear.weight.detach(), 4, group_size, symmetric)
        return cls.from_quantized(q, scales, offsets, group_size, **kw)

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(unpack_int4(self.packed), self.scales, self.offsets)  # (N, K)

    def _packed_mm(self, x2, act_dtype):
        self._check_packed()
        sz = self.aten_sz_bfloat16 if act_dtype == torch.bfloat16 else self.aten_sz_float32
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.aten_weight, self.group_size, sz)
        return y[:, :self.out_features]

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.kernel()}")


def own_aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`t`, copied into an allocation of its own when its data is not `alignment`-byte aligned. The packed int8
    kernel's AVX-512 path loads the weight in 64-byte vectors: fed a tensor read in place from a safetensors file
    (8-byte aligned after the header) it crashed the process (segmentation fault, AVX512 CPU, torch 2.13).
    PyTorch's own CPU allocations are 64-byte aligned."""
    return t if t.data_ptr() % alignment == 0 else t.clone()


class Int8Linear(QuantLinear):
    """Per-output-channel symmetric int8: W[n, k] = scales[n] * weight[n, k], weight int8 in [-127, 127]."""

    def __init__(self, weight, scales, impl: str = "auto", act_dtype=None):
        super().__init__()
        self.register_buffer("weight", own_aligned(weight.to(torch.int8)))
        self.register_buffer("scales", scales.float())
        self.register_buffer("scales_bfloat16", self.scales.bfloat16(), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.set_impl(impl, act_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw):
        w = linear.weight.detach()
        q, scales, offsets = quantize_groups(w, 8, w.shape[1], symmetric=True)  # one group per row
        return cls(q.to(torch.int16) - 128, scales[:, 0], **kw)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    def _packed_mm(self, x2, act_dtype):
        scales = self.scales_bfloat16 if act_dtype == torch.bfloat16 else self.scales
        return torch.ops.aten._weight_int8pack_mm(x2, self.weight, scales)

    def _gemv_unavailable(self) -> str | None:
        if self.in_features % 32:
            return f"the gemv kernel takes in_features a multiple of 32, not {self.in_features}"
        return cpu_gemv.available()

    def _forward_gemv(self, x):
        return cpu_gemv.gemv_int8(x, self.weight, self.scales)

    def _prepare_tiles(self):
        if "tiles_weight" not in self._buffers:
            self.register_buffer("tiles_weight", cpu_gemv.pack_tiles_int8(self.weight), persistent=False)

    def _forward_tiles(self, x):
        self._prepare_tiles()
        return cpu_gemv.tiles_int8(x, self.tiles_weight, self.scales)


def replace_linears(model, make_module, skip=("output",)):
    """The handler: swap every nn.Linear under `model` (except those named in `skip`) for make_module(name, linear)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, make_module(full, child))
    return model


def set_impl(model, impl: str, act_dtype: torch.dtype | None = None):
    """Choose the forward of every quantized Linear: "ref" (dequantize + matmul), "packed" (aten kernels,
    activations cast to act_dtype, default bfloat16) or "auto" (measured per shape, the fastest kept)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_impl(impl, act_dtype)
    return model


def kernels_used(model) -> dict:
    """How many quantized Linears run each kernel: {"packed/bfloat16": 210, ...}."""
    counts: dict = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            counts[m.kernel()] = counts.get(m.kernel(), 0) + 1
    return counts


def model_bytes(model) -> int:
    """Bytes of the weights as stored (the state dict), each storage counted once (a tied head is not
    counted twice). Copies a kernel keeps in its own layout (the packed int4 kernel's) are not counted:
    they hold the same values, and a decode step reads one layout or the other."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.untyped_storage().data_ptr(), t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
