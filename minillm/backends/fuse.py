"""Fused projections: a block's q, k and v projections as one matrix, its gate and up projections as
another, so a decode step makes 4 matmul calls per block instead of 7 (gpt-fast's `wqkv`).

The three projections read the same input, so stacking their weights row-wise computes all three in one
call: y = x @ [Wq; Wk; Wv]^T, then split along the last dimension. Each output element is the same dot
product over the same input, so nothing changes but the number of calls, and each call gets a wider
matrix to spread over the threads. Both matter at decode time, when every call does little work: k and v
are 192 x 576 here, a few microseconds of reading against a fixed toll per call. Measured (AVX512 Zen 4,
2 threads, bfloat16 activations, int4 g64, the packed kernel called directly, 30 layers' weights in
turn): q, k, v 24.3 -> 13.5 us a layer on 1 row, 65.1 -> 48.8 on 8 rows; gate and up 50.9 -> 46.3 and
137.7 -> 117.3.

    fuse_projections(model)      # in place; returns how many groups were fused (2 per block)
    fuse_linears([wq, wk, wv])   # one module computing torch.cat([wq(x), wk(x), wv(x)], -1)

What fuses: plain nn.Linears without bias (prepack.py's PackedLinears too, into a PackedLinear), and
Int4Linears (same group size) or Int8Linears of quant/formats.py, whose rows are stored independently
(int4 groups run along a row, int8 has one scale a row), so stacking their rows stacks the same integers
and scales: the fused int4/int8 layer holds exactly the values of the parts. It keeps the parts' kernel
(impl, activation dtype, chapter 7's matvec_fn) where they agree; where a part ran one-row inputs on cpu_gemv's
kernel, whether the fused layer does is measured again on its wider shape. Anything else (mixed kinds, a bias, a
custom module) is left as it was.

Not handled: training (the fused weight is a new tensor, not the parts' Parameters) and saving a fused
model in the original layout; fuse a copy used for inference (compile_decode fuses the model it wraps).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model.llama import Attention, FeedForward
from ..quant.formats import Int4Linear, Int8Linear
from .prepack import PackedLinear

GROUPS = {Attention: ("wqkv", ("wq", "wk", "wv")), FeedForward: ("w13", ("w1", "w3"))}


def _same(values):
    return len(set(values)) == 1


@torch.no_grad()
def fuse_linears(linears) -> nn.Module | None:
    """One module whose output is torch.cat([m(x) for m in linears], dim=-1), or None where they cannot be
    fused (different kinds or group sizes, a bias, another input width, a module of another kind)."""
    kinds = {PackedLinear: nn.Linear}
    kind = {kinds.get(type(m), type(m)) for m in linears}
    if len(kind) != 1 or not _same(m.in_features for m in linears):
        return None
    kind = kind.pop()
    if kind is nn.Linear:
        if any(m.bias is not None for m in linears) or not _same(m.weight.dtype for m in linears):
            return None
        w = torch.cat([m.weight for m in linears])                            # (sum of outs, in)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if all(type(m) is PackedLinear for m in linears):     # the parts' kernel: prepacked again
            return PackedLinear.from_linear(fused, gemv="auto" if any(m.gemv for m in linears) else False)
        return fused
    if kind is Int4Linear:
        if not _same(m.group_size for m in linears):
            return None
        fused = Int4Linear(*(torch.cat([getattr(m, b) for m in linears]) for b in ("packed", "scales", "offsets")),
                           linears[0].group_size, impl="ref")
    elif kind is Int8Linear:
        fused = Int8Linear(torch.cat([m.weight for m in linears]), torch.cat([m.scales for m in linears]), impl="ref")
    else:
        return None
    same_kernel = _same((m.impl, m.act_dtype) for m in linears)
    fused.set_impl(linears[0].impl if same_kernel else "auto", linears[0].act_dtype if same_kernel else None,
                   gemv="auto" if any(m.gemv for m in linears) else False)   # measured again on the wider shape
    if _same(m.matvec_fn for m in linears) and linears[0].matvec_fn is not None:
        fused.matvec_fn = linears[0].matvec_fn
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Replace each Attention's wq, wk, wv by one `wqkv` and each FeedForward's w1, w3 by one `w13` (their
    forwards split the result), where fuse_linears can; in place. Returns how many groups were fused now
    (a group fused before is left as it is)."""
    fused_now = 0
    for module in list(model.modules()):
        names = GROUPS.get(type(module))
        if names is None or getattr(module, names[0], None) is not None:
            continue
        fused_name, part_names = names
        parts = [getattr(module, n) for n in part_names]
        fused = fuse_linears(parts)
        if fused is None:
            continue
        setattr(module, fused_name, fused)
        for n in part_names:
            delattr(module, n)
        fused_now += 1
    return fused_now


def fused_count(model: nn.Module) -> int:
    """How many projection groups of the model run fused."""
    return sum(getattr(m, names[0], None) is not None for m in model.modules() if (names := GROUPS.get(type(m))))
