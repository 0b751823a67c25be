"""A compiled decode step (gpt-fast's idea, on the CPU): `compile_decode(model)` returns a model whose
forwards over a few new tokens run as `torch.compile`d (inductor) graphs instead of ~600 small
PyTorch calls each dispatched from Python.

Decoding a token with a KV cache costs the weights' bytes plus a fixed toll per operation; for a 135M
model on a CPU the toll is most of the step (chapter 3 profiles it). Compiling removes the toll only if
the graph never changes shape, so every input is made static, and one block is compiled and reused by
every layer (regional compilation: seconds to compile instead of minutes, at the same speed):

    width      the new tokens of a forward are padded up to a bucket, 1, 2, 4, 8 or 16 (plain decoding
               is 1; chapters 5-6 verify 2-16): one graph per bucket, compiled once
    cache      the StaticCache's whole buffers go in; the step writes its keys and values at explicit
               slots and attends over every slot through a mask that hides the slots not yet written
               (the cache's length is an input, not a shape); caches are sized in multiples of 256
    padding    padded tokens write to slots past the real ones (never shown to a later query) and
               attend to slot 0 only, so nothing in them can turn into NaN
    attention  the textbook math (`attention_ref` for one row, `attention_grouped` wider: the query heads
               sharing a kv head as rows of one matmul), which inductor fuses, or the C++ kernel
               (native/attention.py), whichever a short measurement on the model's shapes says is faster
               (`attention="auto"`; "kernel" or "inductor" force one; `repr` says which runs). Not SDPA:
               PyTorch's CPU flash kernel is built for long query blocks, not one row over a masked cache.
               Either way the compiled logits are not bit-equal to eager ones (near-ties can flip).
    projections  each block's q/k/v and gate/up projections run as one matmul each (fuse.py): 4 calls a
               block instead of 7, on the same weights stacked (bit-equal); `fuse=False` leaves them apart
    weights    plain linears are swapped for `PackedLinear`s (prepack.py: oneDNN reorders each weight once,
               where a measurement per shape says it pays; bit-equal), and steps of up to 16 rows run on
               native/gemv.py's kernels at the widths where they measured no slower. Both change the wrapped
               model in place (its state dict then holds `wqkv` and `w13`): wrap a copy to keep the original.

The same logits at every width (`consistent=True`): every linear runs on one native/gemv.py kernel and every
layer attends with the C++ attention kernel, at every width. Both compute a row from that row's inputs alone,
in the same order whatever the width, and the rest of the step works row by row, so a token's logits from a
1-row decode step and from an 8-row verify step are bit-equal (tested) and plain and speculative/tree decoding
give the same tokens while plain decoding keeps its 1-row steps. Needs those kernels (AVX512-BF16) and
bfloat16 or quantized weights; where they cannot run, ValueError says why.

One width for everything (`widths=(8,)`): plain decoding pads each token to 8 rows and a verify step runs the
same graph, so plain and speculative decoding give bit-equal logits on any CPU, at the price of a width-8 step
for every plain token. decode_steps then feeds the prompt in a forward of its own (`prefill_apart`) and cuts
drafts to the widest graph.

Anything else (a prefill wider than 16, a paged or int8 cache, no cache, a cache too full for the padded
width) runs the eager model, so results never depend on what could be compiled. If inductor cannot compile
here (no C++ compiler, an unsupported op), the first call says why in a RuntimeWarning and the model runs
eager from then on.

    fast = compile_decode(model)               # same weights, same results within float tolerance
    generate(fast, ids, 64)                    # first calls compile (seconds); later calls do not
"""
from __future__ import annotations

import types
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache.kv_cache import StaticCache
from ..model.llama import attention_grouped, attention_ref, attention_sdpa, rope_cos_sin, rope_table
from ..native import attention as cpu_attention
from ..native import build as native
from ..native import gemv as cpu_gemv
from ..quant.formats import QuantLinear
from ..timing import median_seconds
from .fuse import fuse_projections, fused_count
from .prepack import PackedLinear, gemv_unavailable, packed_count, prepack_linears

if TYPE_CHECKING:
    from ..model.llama import Transformer

WIDTHS = (1, 2, 4, 8, 16)
CACHE_BUCKET = 256
RECOMPILE_LIMIT = 32  # per wrapper: 5 widths x a few cache sizes
ATTENTION = ("auto", "kernel", "inductor")
# (query heads, kv heads, head_dim, dtype, threads, rows) -> {"inductor": us, "kernel": us}, measured once a process
ATTENTION_CHOICES: dict = {}


class _LayerSlots:
    """One layer's slice of the StaticCache, as the compiled block sees it: writes the new keys and
    values at the given slots and returns the whole slice (the mask hides what is not written yet)."""

    def __init__(self, k, v, slots):
        self.k, self.v, self.slots = k, v, slots

    def update(self, layer: int, k, v):
        self.k[:, :, self.slots] = k                   # (B, nkv, S, hd) <- (B, nkv, W, hd)
        self.v[:, :, self.slots] = v
        return self.k, self.v


def _block(layer, x, cos, sin, mask, k, v, slots):
    """One transformer block over a width-W input; the same graph serves all 30 layers."""
    return layer(x, cos, sin, mask, _LayerSlots(k, v, slots))


def _head(model, x):
    h = model.norm(x)
    return model.output(h), h


def _attend(fn, q, k, v, mask):
    """A layer's attention as the block graph runs it (Attention.forward: k and v repeated unless fn is grouped)."""
    if not getattr(fn, "grouped", False):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return fn(q, k, v, mask)


def attention_timings(config, dtype, rows: int) -> dict:
    """Microseconds of one layer's attention over `rows` query positions, inductor's code against the kernel
    (native/attention.py), each compiled alone as in the block graph, on the config's heads after CACHE_BUCKET
    positions in a cache of 2 x CACHE_BUCKET slots: the short measurement `attention="auto"` decides by.
    Cached per shape, dtype and thread count for the process."""
    key = (config.n_heads, config.n_kv_heads, config.head_dim, dtype, torch.get_num_threads(), rows)
    if key not in ATTENTION_CHOICES:
        gen = torch.Generator().manual_seed(0)
        S, start = 2 * CACHE_BUCKET, CACHE_BUCKET
        q = torch.randn(1, config.n_heads, rows, config.head_dim, generator=gen).to(dtype)
        k, v = (torch.randn(1, config.n_kv_heads, S, config.head_dim, generator=gen).to(dtype) for _ in range(2))
        mask = (torch.arange(S) <= torch.arange(start, start + rows)[:, None])[None, None]
        # both compiled alone, as in the block graph: each call pays dynamo's guard checks and the graph's wrapper
        # alike, so what differs is what each costs inside the block graph (the kernel: its op's call and the
        # kernel; inductor: its fused loops or matmuls). Timing the kernel bare would spare it that toll alone.
        inductor, kernel = (torch.compile(_own_copy(_attend), dynamic=False) for _ in range(2))
        math = attention_ref if rows == 1 else attention_grouped
        calls = {"inductor": lambda: inductor(math, q, k, v, mask),
                 "kernel": lambda: kernel(cpu_attention.attention_cpu, q, k, v, mask)}
        with torch.inference_mode():
            times = {name: [] for name in calls}
            for _ in range(3):                  # in turns, so a slow spell of the machine hits both
                for name, call in calls.items():
                    times[name].append(median_seconds(call, repeats=15, warmup=2))
        ATTENTION_CHOICES[key] = {name: round(1e6 * min(t), 1) for name, t in times.items()}
    return ATTENTION_CHOICES[key]


def _own_copy(fn):
    """The same function with a code object of its own (dynamo's cache of graphs lives on the code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compiler_missing() -> str | None:
    if native.find_compiler() is None:
        return "no C++ compiler found ($CXX, g++ or clang++ on PATH), which inductor needs on the CPU"
    return None


class ModelWrapper(nn.Module):
    """A module holding a Transformer as `.model` (CompiledDecoder, cpu_step.NativeDecoder): what it lacks itself
    (layers, output, config, ...) is read from the model, as drafters read them."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self._modules:
                raise
            return getattr(self._modules["model"], name)


class CompiledDecoder(ModelWrapper):
    """A Transformer whose short forwards over a StaticCache run compiled; see the module docstring."""

    def __init__(self, model, widths=WIDTHS, mode: str | None = None, prepack: bool = True,
                 attention: str = "auto", fuse: bool = True, consistent: bool = False):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if consistent and attention == "inductor":
            raise ValueError("compile_decode(consistent=True) attends with the kernel at every width, not 'inductor'")
        if not hasattr(model, "layers") or not hasattr(model, "config"):
            raise ValueError(f"compile_decode takes a minillm Transformer, got {type(model).__name__}")
        widths = tuple(sorted(widths))
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 64 for w in widths):
            raise ValueError(f"widths must be ints in [1, 64], got {widths!r}")
        self.model, self.config, self.widths = model, model.config, widths
        self.reason_eager = _compiler_missing()     # None while compiling is possible
        dtype = model.tok_embeddings.weight.dtype
        self.attention_choice = "kernel" if consistent else attention
        self.no_kernel = ("not asked for" if attention == "inductor" else self.reason_eager
                          or cpu_attention.available(model.config.head_dim, dtype))
        if consistent:
            attention = "kernel"
            if max(widths) > cpu_gemv.MAX_ROWS:
                raise ValueError(f"compile_decode(consistent=True) takes widths up to {cpu_gemv.MAX_ROWS} (cpu_gemv's), "
                                 f"got {widths}")
        if attention == "kernel" and self.no_kernel:
            raise ValueError(f"compile_decode(attention='kernel'{', consistent=True' * consistent}): {self.no_kernel}")
        self.consistent = consistent
        self.attention = {}                          # rows (1, or wider) -> "kernel" or "inductor", at first use
        self.compiled_calls = self.eager_calls = 0
        self._rope_table = None                      # (cos, sin) of every position, at first use (_rope)
        if fuse:                                     # q/k/v and gate/up as one matmul each: fewer, wider calls
            fuse_projections(model)
        self.fused = fused_count(model)
        if prepack:                                  # leaves the linears alone where oneDNN cannot take them
            prepack_linears(model, max(widths))
        if consistent:                               # every linear on cpu_gemv at every width: rows computed alike
            gemv_everywhere(model)
        self.prepacked = packed_count(model)       # how many linears run prepacked (also those of an earlier wrap)
        if self.reason_eager:
            warnings.warn(f"compile_decode: {self.reason_eager}; running eager", RuntimeWarning, stacklevel=2)
        # dynamo files its compiled graphs under the function's code object, checking each one's guards in
        # turn on every call and running eager past `recompile_limit` (8) graphs. Shared by every wrapper,
        # other models' graphs would slow this one's calls and soon exhaust the limit, so each wrapper
        # compiles its own copies of the functions; each width and cache size adds a graph to them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # inductor still calls torch.jit.script_method, deprecated, while it imports and compiles: silence
        # that one warning (once, here; not a context manager on every step, which is not thread-safe)
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.* is deprecated",
                                category=DeprecationWarning)
        self._block = torch.compile(_own_copy(_block), dynamic=False, mode=mode)
        self._head = torch.compile(_own_copy(_head), dynamic=False, mode=mode)

    def extra_repr(self) -> str:
        chosen = ", ".join(f"{'1 row' if rows == 1 else 'wider'}: {name}" for rows, name in sorted(self.attention.items()))
        return (f"widths={self.widths}, fused projections={self.fused}, prepacked linears={self.prepacked}, "
                f"attention={self.attention_choice}" + (", consistent" if self.consistent else "")
                + (f" ({chosen})" if chosen else "") + (f", eager: {self.reason_eager}" if self.reason_eager else ""))

    def attention_for(self, width: int):
        """The attention function the graphs of this width run: the kernel, or the math inductor fuses (module
        docstring). With attention="auto", chosen by attention_timings at the first call of 1 row and of the
        widest width (its choice serving every width above 1)."""
        rows = 1 if width == 1 else max(self.widths)
        if rows not in self.attention:
            if self.no_kernel:
                self.attention[rows] = "inductor"
            elif self.attention_choice == "kernel":
                self.attention[rows] = "kernel"
            else:
                t = attention_timings(self.config, self.model.tok_embeddings.weight.dtype, rows)
                self.attention[rows] = "kernel" if t["kernel"] < t["inductor"] else "inductor"
        if self.attention[rows] == "kernel":
            return cpu_attention.attention_cpu
        return attention_ref if width == 1 else attention_grouped

    def cache_len(self, n: int) -> int:
        """The cache size decoding should allocate for n tokens: rounded up so few shapes are compiled."""
        return min(-(-(n + max(self.widths)) // CACHE_BUCKET) * CACHE_BUCKET, self.config.max_seq_len)

    def prefill_apart(self, cache) -> bool:
        """Whether decode_steps should feed a prompt in a forward of its own over `cache`: yes where the steps
        run compiled, so the first new token comes from a bucket's graph like every later one, with or
        without a drafter (else its row would sit in a prompt-wide eager forward only in plain decoding)."""
        return type(cache) is StaticCache and not self.reason_eager

    def _forward_static(self, idx, positions, slots, mask, cache, given_positions: bool = True):
        """Transformer.forward's outline (embed -> blocks -> norm -> head) with the blocks and the head
        compiled: regional compilation, so one block graph is compiled once, not thirty."""
        model = self.model
        # the graphs attend with the fusable math (module docstring); a kernel the user put in the slot stays
        swapped = [layer.attn for layer in model.layers if layer.attn.__dict__.get("attn_fn") is attention_sdpa]
        math = self.attention_for(idx.shape[1])                             # module docstring: attention
        for attn in swapped:
            attn.__dict__["attn_fn"] = math
        try:
            x = model.tok_embeddings(idx)
            cos, sin = self._rope(positions, cache.max_len, checked=given_positions)
            for i, layer in enumerate(model.layers):
                x = self._block(layer, x, cos, sin, mask, cache.k[i], cache.v[i], slots)
            return self._head(model, x)
        finally:
            for attn in swapped:
                attn.__dict__["attn_fn"] = attention_sdpa

    def _rope(self, positions, length: int, checked: bool = True):
        """rope_cos_sin(positions), read from a table of every position below `length` (built once, bit-equal,
        tested): computing it costs ~30 us a step, and at 8 positions PyTorch's cos took ~140 us (profiled,
        AVX512, 2 threads: its vectorized cos on 512 values enters a threaded path; on 64 it does not).
        checked: whether positions may fall off the table (the caller's own positions; two reads of values off
        the tensor); forward's own, counted from the cache's length, stay below its max_len and skip that."""
        table = self._rope_table
        if table is None or len(table[0]) < length or table[0].device != positions.device:
            table = self._rope_table = rope_table(max(length, self.config.max_seq_len), self.config.head_dim,
                                                  self.config.rope_theta, positions.device)
        if checked and (int(positions.max()) >= len(table[0]) or int(positions.min()) < 0):   # off the table
            return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        return table[0][positions][:, None], table[1][positions][:, None]

    def forward(self, idx, positions=None, mask=None, cache=None, return_hidden=False):
        B, T = idx.shape
        width = next((w for w in self.widths if w >= T), None)
        if (self.reason_eager or width is None or type(cache) is not StaticCache
                or cache.length + width > cache.max_len):
            self.eager_calls += 1
            return self.model(idx, positions, mask, cache, return_hidden)
        start = cache.length
        given = positions is not None                 # the caller's: _rope checks them against its table
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        key_positions = cache.begin(positions)                      # (B, start + T); cache.length += T
        S = cache.max_len
        full = torch.zeros(B, 1, width, S, dtype=torch.bool, device=idx.device)
        full[:, :, :T, :start + T] = (key_positions[:, None, None, :] <= positions[:, None, :, None]
                                      if mask is None else mask)
        full[:, :, T:, 0] = True                                      # padded queries look at slot 0 only
        pad = width - T
        idx_w = F.pad(idx, (0, pad))
        pos_w = torch.cat([positions, positions[:, -1:].expand(B, pad)], dim=1)
        slots = torch.arange(start, start + width, device=idx.device)
        try:
            logits, hidden = self._forward_static(idx_w, pos_w, slots, full, cache, given)
        except Exception as e:  # inductor could not build it here: say so once, then run eager
            self.reason_eager = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            warnings.warn(f"compile_decode: {self.reason_eager}; running eager", RuntimeWarning, stacklevel=2)
            cache.truncate(start)
            return self.forward(idx, positions, mask, cache, return_hidden)
        self.compiled_calls += 1
        logits, hidden = logits[:, :T], hidden[:, :T]
        return (logits, hidden) if return_hidden else logits


def compile_decode(model: Transformer, widths: tuple[int, ...] = WIDTHS, mode: str | None = None, prepack: bool = True,
                   attention: str = "auto", fuse: bool = True, consistent: bool = False) -> CompiledDecoder:
    """Wrap `model` so its decode and verify steps run as compiled, static-shape graphs (see above);
    prepack: swap its plain linears for oneDNN-prepacked ones where measured faster (prepack.py);
    attention: "kernel" (native/attention.py), "inductor" (the fused math), or "auto", the faster where measured;
    fuse: stack each block's q/k/v and gate/up projections into one matmul each (fuse.py), in place;
    consistent: a token's logits the same at every width (module docstring), or ValueError saying why not here."""
    return CompiledDecoder(model, widths, mode, prepack, attention, fuse, consistent)


def gemv_everywhere(model, kernel=True, who: str = "compile_decode(consistent=True)") -> None:
    """Every linear of `model` (a model, or any module of one) on one of cpu_gemv's kernels for up to cpu_gemv.MAX_ROWS
    rows: kernel True (the faster here), "gemv" or "tiles" (or "auto": each layer's measured plan, maybe none);
    prepacked and plain bfloat16 ones and quantized ones alike.
    ValueError, prefixed with `who`, naming the first it cannot take."""
    why = cpu_gemv.available()
    if why:
        raise ValueError(f"{who}: {why}")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                try:
                    child.set_impl(child.impl, child.act_dtype, gemv=kernel)
                except ValueError as e:
                    raise ValueError(f"{who}: {name}: {e}") from None
            elif isinstance(child, nn.Linear):
                if gemv_unavailable(child.weight) or child.bias is not None:
                    raise ValueError(f"{who}: {name}: "
                                     f"{gemv_unavailable(child.weight) or 'a linear with a bias'} "
                                     f"(cpu_gemv takes bfloat16, int8 and int4 weights)")
                packed = child if isinstance(child, PackedLinear) else PackedLinear.from_linear(child, gemv=False)
                try:
                    packed.set_gemv(kernel)
                except ValueError as e:
                    raise ValueError(f"{who}: {name}: {e}") from None
                if not packed.gemv_plan and kernel != "auto":
                    raise ValueError(f"{who}: {name}: the {kernel} kernel does not run here")
                setattr(module, name, packed)
