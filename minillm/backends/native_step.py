"""A native decode step: every block of the model over a few new tokens in one C++ call (native/csrc/step.cpp), what
llama.cpp does, beside the compiled step of compiled.py.

Why: after quantization a decode step's weights are small (int4 g64 + int8 head: ~85 MB, ~3 ms at the memory's
speed) and the step is mostly the toll of its ~600 small operations. Compiling (compiled.py) fuses most of them,
but the compiled step still enters Python and dynamo once per block (a guard check of ~30 us each, x 30) and runs
inductor's code between the matmuls; profiled on the Xeon VM (AVX512 + AMX, 2 threads, int4 g64 + int8 head): of a
9.7 ms compiled step, the int4 matmuls took ~3.7 ms, the head ~0.8, dynamo's lookups ~1 and the compiled graphs'
own code ~2.5. Here the embedding, the final norm and the head stay PyTorch calls and everything between them is
one op, `torch.ops.minillm.decode_layers_hd64` (one per head size: `op(head_dim)`): per block the norms, RoPE,
cache writes, attention and SwiGLU are plain loops over a few rows, and the matmuls call cpu_gemv's kernels (gemv.h,
tiles.h) directly, no dispatcher between.

    from minillm.backends.native_step import native_decode
    fast = native_decode(model)                # same weights; forwards of 1-16 new tokens over a StaticCache native
    generate(fast, ids, 64)                    # the prompt (wider) runs eager, then every step is one call

What it takes: bfloat16, int8 or int4 linears in the blocks (a float32 model's have no few-row kernel here: ValueError),
a dense feed-forward, batch 1 and a StaticCache in the model's dtype; anything else runs the wrapped model eager.
Every linear of the blocks (and the head, where quantized or bfloat16) runs on one kernel at every width (cpu_gemv's
gemv, or the AMX tiles where faster over 1 and 8 rows, or the one `kernel` names), and every row is computed from its
own inputs alone, so a token's logits from a 1-row step and from an 8-row verify step are bit-equal: plain, speculative
and tree decoding give the same tokens (tested), as compile_decode(consistent=True) does.

It follows model/llama.py's eager arithmetic (float32 math, rounded to the activations' dtype after each op), but sums in
another order: logits agree with the eager model's to float rounding (tests/test_cpu_step.py), not bit for bit.
The reference beside it is the model itself: `fast.model`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..cache.kv_cache import StaticCache
from ..model.llama import FeedForward, rope_table
from ..native import build as native
from ..native import gemv as cpu_gemv
from ..quant.formats import Int4Linear, Int8Linear, QuantLinear
from .compiled import ModelWrapper, gemv_everywhere
from .fuse import fuse_projections
from .prepack import PackedLinear, gemv_unavailable

# the kernels step.cpp knows, by (kernel, weight class): its enum Kind
KINDS = {("gemv", "bf16"): 0, ("gemv", "int8"): 1, ("gemv", "int4"): 2,
         ("tiles", "bf16"): 3, ("tiles", "int8"): 4, ("tiles", "int4"): 5}
_EMPTY = torch.empty(0)


def _setup(lib) -> None:
    if not lib.minillm_step_kernels() & 1:
        raise RuntimeError("the native step needs AVX512-BF16 instructions, which this CPU (or compiler) lacks")


def available(head_dim: int = 64) -> str | None:
    """None if the native step runs here for heads of `head_dim` (building it if needed), else why not."""
    why = cpu_gemv.available()
    if why:
        return why
    if head_dim % 16 or not 16 <= head_dim <= 256:
        return f"the native step takes head_dim a multiple of 16 up to 256, not {head_dim}"
    try:
        native.load("step.cpp", {"HD": head_dim, **cpu_gemv.TILES_DEFINES}, setup=_setup, with_torch=True)
    except RuntimeError as e:
        return str(e)
    return None


def op(head_dim: int = 64):
    """The native step's op for heads of `head_dim`, built and registered first if needed (ValueError if it cannot
    run here): torch.ops.minillm.decode_layers_hd<head_dim>."""
    why = available(head_dim)
    if why:
        raise ValueError(f"native_decode: {why}")
    return getattr(torch.ops.minillm, f"decode_layers{'_emulated' if cpu_gemv.EMULATED else ''}_hd{head_dim}")


def linear_args(module, rows: int = 1) -> tuple:
    """(kind, group size, weight, scales, offsets): what step.cpp reads of `module` for inputs of `rows` rows, on the
    kernel its plan names (cpu_gemv.kernel_for); ValueError where it names none."""
    kernel = cpu_gemv.kernel_for(getattr(module, "gemv_plan", ()), rows)
    if kernel is None:
        raise ValueError(f"{type(module).__name__} runs no few-row kernel on {rows} rows")
    if isinstance(module, Int4Linear):
        if kernel == "tiles":
            module._prepare_tiles()
            return KINDS["tiles", "int4"], module.group_size, module.tiles_q, module.tiles_scales, module.tiles_offsets
        module._prepare_gemv()
        return KINDS["gemv", "int4"], module.group_size, module.packed, module.gemv_scales, module.gemv_offsets
    if isinstance(module, Int8Linear):
        if kernel == "tiles":
            module._prepare_tiles()
            return KINDS["tiles", "int8"], 0, module.tiles_weight, module.scales, _EMPTY
        return KINDS["gemv", "int8"], 0, module.weight, module.scales, _EMPTY
    if isinstance(module, PackedLinear):
        w = module.tiles_weight if kernel == "tiles" else module.weight.detach()
        return KINDS[kernel, "bf16"], 0, w, _EMPTY, _EMPTY
    raise ValueError(f"the native step takes Int4Linear, Int8Linear and bfloat16 linears, not {type(module).__name__}")


def unavailable(model) -> str | None:
    """None if native_decode takes `model` on this machine (its C++ step built if needed), else why not, in a phrase.
    Checks everything before anything changes: the CPU and compiler, a dense feed-forward, the dtype, and a few-row
    kernel for every linear of the blocks."""
    if not hasattr(model, "layers") or not hasattr(model, "config"):
        return f"it takes a minillm Transformer, not {type(model).__name__}"
    if not all(isinstance(layer.ffn, FeedForward) for layer in model.layers):
        return "it takes a dense feed-forward in every block, not a mixture of experts"
    dtype = model.tok_embeddings.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return f"it takes a float32 or bfloat16 model, not {dtype}"
    norms = [model.norm.weight] + [w for layer in model.layers for w in (layer.attn_norm.weight, layer.ffn_norm.weight)]
    if any(w.dtype != dtype for w in norms):
        return f"it takes norm weights in the model's dtype ({dtype})"
    for i, layer in enumerate(model.layers):
        for name, m in layer.named_modules():
            if isinstance(m, QuantLinear):
                why = m._gemv_unavailable() and m._tiles_unavailable()
            elif isinstance(m, nn.Linear):
                why = gemv_unavailable(m.weight) or ("a linear with a bias" if m.bias is not None else None)
            else:
                continue
            if why:
                return f"layer {i}: {name}: {why}"
    return available(model.config.head_dim)


class NativeDecoder(ModelWrapper):
    """A Transformer whose forwards over 1-16 new tokens in a StaticCache run as one C++ call; see the module
    docstring. `.model` is the wrapped model (its linears set to cpu_gemv's kernels, q/k/v and gate/up fused)."""

    def __init__(self, model, kernel=True):
        super().__init__()
        if not hasattr(model, "layers") or not hasattr(model, "config"):
            raise ValueError(f"native_decode takes a minillm Transformer, got {type(model).__name__}")
        if kernel not in (True, "auto", *cpu_gemv.KERNELS):
            raise ValueError(f"kernel must be True, 'auto' or one of {cpu_gemv.KERNELS}, got {kernel!r}")
        why = unavailable(model)
        if why:
            raise ValueError(f"native_decode: {why}")
        self._op = op(model.config.head_dim)
        c, dtype = model.config, model.tok_embeddings.weight.dtype
        self.model, self.config, self.dtype = model, c, dtype
        fuse_projections(model)
        for i, layer in enumerate(model.layers):      # every linear of the blocks on cpu_gemv's kernels
            gemv_everywhere(layer, kernel, who=f"native_decode: layer {i}")
            for m in layer.modules():                 # "auto" where no kernel paid on one row: one call still pays
                if isinstance(m, (QuantLinear, PackedLinear)) and not m.gemv_plan:
                    m.set_impl(m.impl, m.act_dtype, gemv=True) if isinstance(m, QuantLinear) else m.set_gemv(True)
        try:                                          # the head too, where a few-row kernel takes it
            holder = nn.ModuleDict({"output": model.output})
            gemv_everywhere(holder, kernel, who="head")
            model.output = holder["output"]                # a bfloat16 head becomes a PackedLinear (same weight)
            self.head = "cpu_gemv" + cpu_gemv.describe(model.output.gemv_plan)
        except ValueError as e:
            self.head = f"PyTorch ({str(e).split(': ', 2)[-1]})"
        # "auto": each linear's plan may end below cpu_gemv.MAX_ROWS (cpu_gemv.choose stops where its kernels stop paying)
        self.max_rows = min(m.gemv_rows for layer in model.layers for m in layer.modules()
                            if isinstance(m, (QuantLinear, PackedLinear)))
        self.native_calls = self.eager_calls = 0
        self._args: dict = {}                         # rows -> (tensors, kinds) for the op
        self._rope = rope_table(c.max_seq_len, c.head_dim, c.rope_theta)   # (positions, head_dim) each

    @property
    def widths(self) -> tuple:    # decode_steps cuts drafts to the widest forward that runs native
        return tuple(range(1, self.max_rows + 1))

    def extra_repr(self) -> str:
        kernels = sorted({cpu_gemv.describe(m.gemv_plan)[2:] for layer in self.model.layers for m in layer.modules()
                          if isinstance(m, (QuantLinear, PackedLinear))})
        return f"blocks: {'; '.join(kernels)}, head: {self.head}"

    def prefill_apart(self, cache) -> bool:
        """decode_steps feeds a prompt in a forward of its own (module docstring of compiled.py): every later token
        then comes from a native step, with or without a drafter."""
        return type(cache) is StaticCache

    def arguments(self, rows: int) -> tuple:
        """(tensors, kinds): the op's weights for inputs of `rows` rows, built once per width."""
        if rows not in self._args:
            tensors, kinds = [], []
            for layer in self.model.layers:
                tensors += [layer.attn_norm.weight.detach(), layer.ffn_norm.weight.detach()]
                for module in (layer.attn.wqkv, layer.attn.wo, layer.ffn.w13, layer.ffn.w2):
                    kind, group, *ts = linear_args(module, rows)
                    tensors += ts
                    kinds += [kind, group]
            self._args[rows] = (tensors, kinds)
        return self._args[rows]

    def runs_native(self, idx, cache) -> bool:
        B, T = idx.shape
        return (B == 1 and 1 <= T <= self.max_rows and type(cache) is StaticCache and cache.k.dtype == self.dtype
                and cache.k.device.type == "cpu" and cache.length + T <= cache.max_len)

    def forward(self, idx, positions=None, mask=None, cache=None, return_hidden=False):
        if not self.runs_native(idx, cache):
            self.eager_calls += 1
            return self.model(idx, positions, mask, cache, return_hidden)
        T, start, model, c = idx.shape[1], cache.length, self.model, self.config
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)[None]
        elif int(positions.min()) < 0 or int(positions.max()) >= len(self._rope[0]):
            raise ValueError(f"positions must lie in [0, {len(self._rope[0])}), got {positions.tolist()}")
        key_positions = cache.begin(positions)                                   # (1, start + T)
        see = (key_positions[0, None, :] <= positions[0, :, None]) if mask is None else \
            mask.reshape(-1, *mask.shape[-2:])[0].expand(T, start + T)
        tensors, kinds = self.arguments(T)
        with torch.no_grad():
            x = model.tok_embeddings(idx)[0]
            p = positions[0]
            _, h = self._op(
                x, tensors, kinds, cache.k, cache.v, start, see.contiguous(), self._rope[0][p], self._rope[1][p],
                model.norm.weight.detach(), c.n_heads, c.n_kv_heads, c.norm_eps)
            logits = model.output(h)[None]
        self.native_calls += 1
        return (logits, h[None]) if return_hidden else logits


def native_decode(model, kernel=True) -> NativeDecoder:
    """Wrap `model` so its forwards of 1-16 new tokens over a StaticCache run as one C++ call (module docstring).
    kernel: True (each linear on the faster of cpu_gemv's kernels here over 1 and 8 rows, at every width: a token's
    logits the same at every width), "gemv" or "tiles" (that one at every width), or "auto" (at each width the faster,
    as each linear measures it (cpu_gemv.choose): plain decoding may then run gemv and a verify step the tiles, whose
    sums differ in order; up to the widest width where they paid). Changes the model's modules in place (fused
    projections, cpu_gemv kernels): wrap a copy to keep the original."""
    return NativeDecoder(model, kernel)
