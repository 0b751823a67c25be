"""How many full tensors an eager PyTorch computation reads and writes: the traffic a fused kernel avoids.

Eager PyTorch runs one kernel per operation, and each reads its inputs from memory and writes its
output back. `tensor_traffic` runs a function under a dispatch mode that sees every aten operation
and adds up the elements each one reads and writes, in units of one tensor of `unit_numel` elements:

    tensor_traffic(lambda: norm(x + attn_out), x.numel())   # RMSNorm after the residual add, eager

A fused kernel reads each input once and writes each output once. Views (reshape, transpose, expand)
move nothing and are not counted.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"view", "_unsafe_view", "reshape", "transpose", "t", "expand", "permute", "unsqueeze", "squeeze",
         "alias", "detach", "slice", "select", "as_strided"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.elements, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            leaves = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {}, out)) if isinstance(a, torch.Tensor)]
            self.elements += sum(t.numel() for t in leaves)
            self.ops.append(name)
        return out


def tensor_traffic(fn, unit_numel: int) -> tuple[float, list[str]]:
    """(elements read + written by fn's eager operations / unit_numel, the operations run)."""
    counter = _Counter()
    with counter:
        fn()
    return counter.elements / unit_numel, counter.ops
