"""Prepacked linears: the weight of an nn.Linear reordered once into oneDNN's blocked layout, instead of
on every call.

A bfloat16 `F.linear` on the CPU runs oneDNN's matmul, which first reorders the weight matrix into
the blocked layout its inner loop reads, on every call: for a decode step that reads each weight
once, that reorder is a second pass over every byte. `torch.ops.mkldnn._reorder_linear_weight` does
it once; `torch.ops.mkldnn._linear_pointwise` then runs on the reordered copy (`bench quant` measures
what it buys). The results are bit-equal to F.linear's (same kernel, same blocks; tested), so swapping
changes no token.

    n = prepack_linears(model)       # every plain nn.Linear whose packed copy measured faster
    PackedLinear.forward_ref          # F.linear on the plain weight: the reference, kept beside it

Inside torch.compile the packed copy cannot travel as a graph input (dynamo has no fake tensor for
oneDNN's opaque layout), so the call is an op of its own, `minillm::prepacked_linear(x, weight)`,
which finds the packed copy by the weight's storage; the compiled block graph is shared by all 30
layers and each call brings its own layer's weight. A weight changed since it was packed (an
in-place edit, `.to(dtype)`) is no longer found and runs the plain F.linear: a stale copy is never
used. The price is memory: the packed copy sits beside the plain weight (which the embedding, the
state dict and the reference still read).

Which kernel runs is measured, per weight shape, dtype and thread count, never assumed (a machine
without oneDNN, or one where its reorder does not pay, keeps F.linear); `PACK_CHOICES` holds the
timings and `repr(module)` says `kernel=onednn-prepacked`.

A few rows (a decode step, a verify step) can run on another kernel: native/gemv.py's, written for them, and
where the CPU has AMX its tile kernel (on a copy of the weight in the tile layout). `PackedLinear.from_linear`
measures them against the prepacked copy per weight shape at widths 1 to 16 (`choose_gemv`, `GEMV_CHOICES`) and
`repr` says which runs how many rows (`1 row: gemv, 2-16 rows: tiles`); their outputs differ from F.linear's by
float32 summation order, no longer bit-equal (`gemv=False` keeps the bits).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..native import gemv as cpu_gemv
from ..timing import median_seconds

PACK_CHOICES: dict = {}     # (out, in, dtype, threads, rows) -> {"plain": ms, "prepacked": ms}
GEMV_CHOICES: dict = {}     # (out, in, threads) -> (cpu_gemv's plan, {width: {"gemv": ms, "tiles": ms, "prepacked": ms}})
_PACKED: dict = {}          # weight.data_ptr() -> (shape, strides, dtype, version, packed copy)

_lib = torch.library.Library("minillm", "DEF")
_lib.define("prepacked_linear(Tensor x, Tensor weight) -> Tensor")


def _version(t):
    return None if t.is_inference() else t._version   # inference tensors keep no version counter (nor change)


def _packed_copy(weight):
    entry = _PACKED.get(weight.data_ptr())
    if entry is None or entry[:4] != (weight.shape, weight.stride(), weight.dtype, _version(weight)):
        return None
    return entry[4]


def _prepacked_linear(x, weight):
    packed = _packed_copy(weight)
    if packed is None:                    # never packed, or changed since: the plain kernel
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _prepacked_linear_shape(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# a plain library op (not torch.library.custom_op): its Python wrapper costs ~10 us a call, x 211 linears
_lib.impl("prepacked_linear", _prepacked_linear, "CPU")
_lib.impl("prepacked_linear", _prepacked_linear_shape, "Meta")
prepacked_linear = torch.ops.minillm.prepacked_linear.default


def available(dtype=torch.bfloat16) -> str | None:
    """None if oneDNN can prepack `dtype` weights here, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch was built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this PyTorch has no torch.ops.mkldnn._reorder_linear_weight"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bfloat16 kernels on this CPU"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN linears take float32 or bfloat16 weights, not {dtype}"
    return None


def pack_weight(weight: torch.Tensor, rows: int = 8) -> None:
    """Reorder `weight` (out, in) into oneDNN's layout for batches of about `rows` rows, once; kept until
    the weight is freed."""
    why = available(weight.dtype)
    if why:
        raise ValueError(f"cannot prepack a {weight.dtype} weight: {why}")
    if weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"prepacking takes a 2-D CPU weight, got {tuple(weight.shape)} on {weight.device}")
    if _packed_copy(weight) is not None:
        return
    ptr = weight.data_ptr()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    _PACKED[ptr] = (weight.shape, weight.stride(), weight.dtype, _version(weight), packed)
    weakref.finalize(weight, _PACKED.pop, ptr, None)


class PackedLinear(nn.Linear):
    """An nn.Linear (same `weight` Parameter, same state dict) whose forward runs on a prepacked copy; bfloat16
    inputs of a few rows on cpu_gemv's kernels instead, where they measured no slower (`gemv_plan`, choose_gemv):
    "gemv" reads the weight as it is, "tiles" a copy in the tile layout made with the weight's version."""
    gemv_plan: tuple = ()       # ((up to rows, "gemv" | "tiles"), ...): cpu_gemv.choose's

    @property
    def gemv_rows(self) -> int:
        return self.gemv_plan[-1][0] if self.gemv_plan else 0

    @property
    def gemv(self) -> bool:
        return bool(self.gemv_plan)

    def forward(self, x):
        if (x.device.type != "cpu" or self.bias is not None or x.dtype != self.weight.dtype
                or (torch.is_grad_enabled() and self.weight.requires_grad)):  # the ops have no backward
            return F.linear(x, self.weight, self.bias)
        rows = x.shape[:-1].numel()
        kernel = cpu_gemv.kernel_for(self.gemv_plan, rows) if rows else None
        if kernel is not None:
            if kernel == "tiles":
                # where the copy is of the weight as it is now; a compiled step skips the check (traced once, with
                # the copy: dynamo's view of the version while tracing is not the tensor's)
                if torch.compiler.is_compiling() or self.tiles_version == _version(self.weight):
                    return cpu_gemv.tiles_bf16(x, self.tiles_weight)
            elif self.weight.stride(1) == 1:                                # reads the weight as it is now
                return cpu_gemv.gemv_bf16(x, self.weight)
        return prepacked_linear(x, self.weight)

    def _few_row_calls(self) -> dict:
        """{"gemv": call, "tiles": call}: cpu_gemv's kernels that take this weight here (the tile copy made)."""
        w, calls = self.weight, {}
        if gemv_unavailable(w) is None:
            calls["gemv"] = lambda x: cpu_gemv.gemv_bf16(x, w)
        if w.dtype == torch.bfloat16 and cpu_gemv.tiles_unavailable(*w.shape) is None:
            if "tiles_weight" not in self._buffers:
                self.register_buffer("tiles_weight", cpu_gemv.pack_tiles_bf16(w.detach()), persistent=False)
                self.tiles_version = _version(w)
            calls["tiles"] = lambda x: cpu_gemv.tiles_bf16(x, self.tiles_weight)
        return calls

    @torch.no_grad()
    def set_gemv(self, gemv) -> PackedLinear:
        """Inputs of a few rows on cpu_gemv's kernels: "auto" (the kernel, and up to the widest width, where it paid:
        choose_gemv), True (up to cpu_gemv.MAX_ROWS rows on the faster of those that run here, none where none
        does), "gemv" or "tiles" (up to MAX_ROWS on that one, where it runs), or False."""
        if gemv not in (True, False, "auto", *cpu_gemv.KERNELS):
            raise ValueError(f"gemv must be True, False, 'auto' or one of {cpu_gemv.KERNELS}, got {gemv!r}")
        self.gemv_plan = ()
        if gemv == "auto":
            self.gemv_plan = choose_gemv(self)
        elif gemv:
            self.gemv_plan = cpu_gemv.every_width(gemv, self._few_row_calls(), lambda rows: _random_rows(self.weight, rows))
        if "tiles" not in dict(self.gemv_plan).values():
            self._buffers.pop("tiles_weight", None)
        return self

    def forward_ref(self, x):
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: int = 8, gemv="auto") -> PackedLinear:
        """gemv: inputs of a few rows on cpu_gemv's kernels (set_gemv): "auto", True, "gemv", "tiles" or False."""
        if linear.bias is not None:
            raise ValueError("PackedLinear takes linears without a bias (SmolLM2's have none)")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, None     # the same Parameter: a tied head stays tied
        pack_weight(module.weight, rows)
        return module.set_gemv(gemv)

    def kernel(self) -> str:
        name = "onednn-prepacked" if _packed_copy(self.weight) is not None else "plain (weight changed since packing)"
        return name + cpu_gemv.describe(self.gemv_plan)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel()}"


@torch.no_grad()
def pays(linear: nn.Linear, rows: int = 8, repeats: int = 7) -> bool:
    """Whether the prepacked copy of this linear's weight ran faster than F.linear here, on 1 and `rows`
    rows together; measured once per (shape, dtype, threads) and kept in PACK_CHOICES."""
    w = linear.weight
    key = (w.shape[0], w.shape[1], str(w.dtype).replace("torch.", ""), torch.get_num_threads(), rows)
    if key not in PACK_CHOICES:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)
        times = {"plain": 0.0, "prepacked": 0.0}
        for r in sorted({1, rows}):
            x = torch.randn(r, w.shape[1], dtype=w.dtype)
            times["plain"] += 1e3 * median_seconds(lambda: F.linear(x, w), repeats)
            times["prepacked"] += 1e3 * median_seconds(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
        PACK_CHOICES[key] = {k: round(v, 4) for k, v in times.items()}
    return PACK_CHOICES[key]["prepacked"] < PACK_CHOICES[key]["plain"]


def gemv_unavailable(weight: torch.Tensor) -> str | None:
    """None if cpu_gemv's bfloat16 kernel takes this weight here, else why not."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.shape[1] % 32 or weight.stride(1) != 1:
        return f"the gemv kernel takes bfloat16 weights with contiguous rows of a multiple of 32, not {weight.dtype} " \
               f"{tuple(weight.shape)}"
    return cpu_gemv.available()


def _random_rows(weight, rows: int):
    return torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)


@torch.no_grad()
def choose_gemv(module: PackedLinear) -> tuple:
    """Which of cpu_gemv's kernels inputs of each width should run on (bfloat16 weights, where one runs here): a
    plan measured once per (shape, threads) against the prepacked copy at cpu_gemv.WIDTHS (cpu_gemv.choose, as
    quant/formats.py's QuantLinear does); () where none paid on one row."""
    w, calls = module.weight, module._few_row_calls()
    if not calls:
        return ()
    key = (w.shape[0], w.shape[1], torch.get_num_threads())
    if key not in GEMV_CHOICES:
        GEMV_CHOICES[key] = cpu_gemv.choose(calls, "prepacked", lambda x: prepacked_linear(x, w),
                                            lambda rows: _random_rows(w, rows))
    return GEMV_CHOICES[key][0]


def prepack_linears(model: nn.Module, rows: int = 8, measure: bool = True) -> int:
    """Swap every plain nn.Linear of `model` (the tied output head included) for a PackedLinear where oneDNN
    can prepack its weight and, with `measure`, the packed copy measured faster here. Returns how many
    were swapped (0 where oneDNN is missing: the model is left as it was)."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child.bias is not None or child.weight.device.type != "cpu":
                continue
            if available(child.weight.dtype) or (measure and not pays(child, rows)):
                continue
            setattr(module, name, PackedLinear.from_linear(child, rows))
            swapped += 1
    return swapped


def packed_count(model: nn.Module) -> int:
    """How many of the model's linears run on a prepacked copy now."""
    return sum(isinstance(m, PackedLinear) and _packed_copy(m.weight) is not None for m in model.modules())


def linear_kernels(model: nn.Module) -> str:
    """What the benches print: "121 linears oneDNN-prepacked (cpu_gemv: 121 on 1-16 rows: tiles), 0 plain", and for
    quantized models how many run a few rows on which of cpu_gemv's kernels."""
    packed = packed_count(model)
    plain = sum(isinstance(m, nn.Linear) for m in model.modules()) - packed
    out = f"{packed} linears oneDNN-prepacked ({_on_gemv([m for m in model.modules() if isinstance(m, PackedLinear)])})" \
          f", {plain} plain"
    quantized = [m for m in model.modules() if hasattr(m, "gemv_rows") and not isinstance(m, nn.Linear)]
    if quantized:
        out += f"; of {len(quantized)} quantized, {_on_gemv(quantized)}"
    return out


def _on_gemv(modules) -> str:
    """"cpu_gemv: 121 on 1-16 rows: tiles", "cpu_gemv: 120 on 1 row: gemv, 2-16 rows: tiles; 1 on 1-16 rows: tiles",
    "cpu_gemv: none"."""
    counts = {}
    for m in modules:
        if m.gemv_plan:
            counts[m.gemv_plan] = counts.get(m.gemv_plan, 0) + 1
    parts = [f"{n} on {cpu_gemv.describe(plan)[2:]}" for plan, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "cpu_gemv: " + ("; ".join(parts) or "none")
