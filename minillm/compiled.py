"""A compiled decode step (gpt-fast's idea, on the CPU): `compile_decode(model)` returns a model whose
forwards over a few new tokens run as `torch.compile`d (inductor) graphs instead of ~600 small
PyTorch calls each dispatched from Python.

Decoding a token with a KV cache costs the weights' bytes plus a fixed toll per operation; for a
135M model on a CPU the toll is most of the step (chapter 3's profile: int4 matmuls ~12 ms of a ~39 ms
step). Compiling removes the toll, but only if the graph never changes shape, so every input is made
static, and one block is compiled and reused by every layer (regional compilation: seconds to
compile instead of minutes for the whole 30-layer graph, at the same speed):

    width      the new tokens of a forward are padded up to a bucket, 1, 2, 4, 8 or 16 (plain
               decoding is 1; chapters 5-6 verify 2-16): one graph per bucket, compiled once
    cache      the StaticCache's whole buffers go in; the step writes its keys and values at explicit
               slots and attends over every slot through a mask that hides the slots not yet written
               (so the cache's length is an input, not a shape); caches are sized in multiples of 256
    padding    padded tokens write to slots past the real ones (never shown to a later query) and
               attend to slot 0 only, so nothing in them can turn into NaN
    attention  inside the graphs the layers attend with the textbook math (matmul, masked softmax,
               matmul), which inductor fuses, instead of SDPA. One row: `attention_ref`, which inductor
               turns into loops reading the cache in place; wider: `attention_grouped`, the query heads
               sharing a kv head as rows of one matmul, where attention_ref's batched matmuls need k and v
               copied per query head (measured, bfloat16, AVX512, 2 threads: 8 rows 26.6 -> 23.9 ms a step;
               on 1 row grouped was the slower, 18.5 against 17.3 ms). Why not SDPA: PyTorch's CPU flash kernel
               is built for long query blocks, and one query row over a masked 256-slot cache cost
               it ~260 us per layer (profiled, AVX512, 2 threads), a third of the whole step; with
               the math the step went from 21.3 to 12.4 ms (bfloat16, int4 Q4_1 + int8 head). The
               price: the compiled logits are no longer bit-equal to eager ones (near-ties can flip).
               Eager calls keep the layers' own attn_fn.
    weights    plain bfloat16/float32 linears (the output head too) are swapped for `PackedLinear`s
               (prepack.py): oneDNN reorders each weight once instead of at every call, where a short
               measurement per shape says it pays; bit-equal outputs. `prepack=False` leaves them.
               This changes the wrapped model's modules (its weights and state dict stay as they were).

One width for everything (`compile_decode(model, widths=(8,))`, `--compile --fixed-width 8`): plain
decoding then pads each token to 8 rows and a verify step of up to 8 tokens runs the same graph, so a
token's logits are computed by the same kernels on the same shapes whichever way it was reached: plain
and speculative/tree decoding give bit-equal logits, hence the same tokens, in bfloat16 and int4 too
(with several widths a 1-row and an 8-row matmul round near-ties differently). The price: plain decoding
pays for a width-8 step. decode_steps feeds the prompt in a forward of its own (`prefill_apart`) and cuts
drafts to the widest graph, so no step falls back to eager.

Anything else (a prefill wider than 16, a paged or int8 cache, no cache, a cache too full for the
padded width) runs the eager model, so results never depend on what could be compiled. If inductor
cannot compile on this machine (no C++ compiler, an unsupported op), the first call says why in a
RuntimeWarning and the model runs eager from then on.

    fast = compile_decode(model)               # same weights, same results within float tolerance
    generate(fast, ids, 64)                    # first calls compile (seconds); later calls do not
"""
from __future__ import annotations

import os
import shutil
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import StaticCache
from .model import attention_grouped, attention_ref, attention_sdpa, rope_cos_sin
from .prepack import packed_count, prepack_linears

WIDTHS = (1, 2, 4, 8, 16)
CACHE_BUCKET = 256
RECOMPILE_LIMIT = 32  # per wrapper: 5 widths x a few cache sizes


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


def _own_copy(fn):
    """The same function with a code object of its own (dynamo's cache of graphs lives on the code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and shutil.which("clang++") is None:
        return f"no C++ compiler found ({cxx!r} or 'clang++' on PATH), which inductor needs on the CPU"
    return None


class CompiledDecoder(nn.Module):
    """A Transformer whose short forwards over a StaticCache run compiled; see the module docstring."""

    def __init__(self, model, widths=WIDTHS, mode: str | None = None, prepack: bool = True):
        super().__init__()
        if not hasattr(model, "layers") or not hasattr(model, "config"):
            raise ValueError(f"compile_decode takes a minillm Transformer, got {type(model).__name__}")
        widths = tuple(sorted(widths))
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 64 for w in widths):
            raise ValueError(f"widths must be ints in [1, 64], got {widths!r}")
        self.model, self.config, self.widths = model, model.config, widths
        self.reason_eager = _compiler_missing()     # None while compiling is possible
        self.compiled_calls = self.eager_calls = 0
        if prepack:                                  # leaves the linears alone where oneDNN cannot take them
            prepack_linears(model, max(widths))
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

    def __getattr__(self, name):  # layers, output, ...: the wrapped model's (drafters read them)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self._modules:
                raise
            return getattr(self._modules["model"], name)

    def cache_len(self, n: int) -> int:
        """The cache size decoding should allocate for n tokens: rounded up so few shapes are compiled."""
        return min(-(-(n + max(self.widths)) // CACHE_BUCKET) * CACHE_BUCKET, self.config.max_seq_len)

    def prefill_apart(self, cache) -> bool:
        """Whether decode_steps should feed a prompt in a forward of its own over `cache`: yes where the steps
        run compiled, so the first new token comes from a bucket's graph like every later one, with or
        without a drafter (else its row would sit in a prompt-wide eager forward only in plain decoding)."""
        return type(cache) is StaticCache and not self.reason_eager

    def _forward_static(self, idx, positions, slots, mask, cache):
        """Transformer.forward's outline (embed -> blocks -> norm -> head) with the blocks and the head
        compiled: regional compilation, so one block graph is compiled once, not thirty."""
        model = self.model
        # the graphs attend with the fusable math (module docstring); a kernel the user put in the slot stays
        swapped = [layer.attn for layer in model.layers if layer.attn.__dict__.get("attn_fn") is attention_sdpa]
        math = attention_ref if idx.shape[1] == 1 else attention_grouped     # module docstring: attention
        for attn in swapped:
            attn.__dict__["attn_fn"] = math
        try:
            x = model.tok_embeddings(idx)
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
            for i, layer in enumerate(model.layers):
                x = self._block(layer, x, cos, sin, mask, cache.k[i], cache.v[i], slots)
            return self._head(model, x)
        finally:
            for attn in swapped:
                attn.__dict__["attn_fn"] = attention_sdpa

    def forward(self, idx, positions=None, mask=None, cache=None, return_hidden=False):
        B, T = idx.shape
        width = next((w for w in self.widths if w >= T), None)
        if (self.reason_eager or width is None or type(cache) is not StaticCache
                or cache.length + width > cache.max_len):
            self.eager_calls += 1
            return self.model(idx, positions, mask, cache, return_hidden)
        start = cache.length
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
            logits, hidden = self._forward_static(idx_w, pos_w, slots, full, cache)
        except Exception as e:  # inductor could not build it here: say so once, then run eager
            self.reason_eager = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            warnings.warn(f"compile_decode: {self.reason_eager}; running eager", RuntimeWarning, stacklevel=2)
            cache.truncate(start)
            return self.forward(idx, positions, mask, cache, return_hidden)
        self.compiled_calls += 1
        logits, hidden = logits[:, :T], hidden[:, :T]
        return (logits, hidden) if return_hidden else logits


def compile_decode(model, widths=WIDTHS, mode: str | None = None, prepack: bool = True) -> CompiledDecoder:
    """Wrap `model` so its decode and verify steps run as compiled, static-shape graphs (see above);
    prepack: swap its plain linears for oneDNN-prepacked ones where measured faster (prepack.py)."""
    return CompiledDecoder(model, widths, mode, prepack)
