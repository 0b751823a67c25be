"""How minillm uses the kernels: `use_kernels(model, "triton")` swaps three things in place.

This module depends on the model (minillm.model, minillm.quant); the model knows nothing of it.
The CLI (`--kernels triton`) and notebook 07 call it.

- attention: each layer's `attn.attn_fn(q, k, v, mask)` becomes flash_attention with the mask
  (which already encodes causality by position, padding, or a chapter-6 tree);
- RMSNorm: every RMSNorm's `norm_fn` slot gets the fused Triton kernel (no residual here: the
  model's block adds the residual itself);
- int4 linears (minillm.quant.Int4Linear): the `matvec_fn` slot, which one-token inputs (decoding)
  go through, gets int4_matvec; longer inputs (prefill) keep the module's own path, which is
  compute-bound and already a matmul.

The model offers these three slots (`attn_fn`, `norm_fn`, `matvec_fn`); nothing's `forward` is replaced.

`use_kernels(model, "torch")` restores what was there. If Triton cannot run here (not installed,
no GPU and no interpreter, a model on the wrong device, bfloat16 under the interpreter), the model
keeps its PyTorch path and a warning says why; `model.kernels` tells which path is active.
"""
from __future__ import annotations

import warnings

import torch

from minillm.model import RMSNorm
from minillm.quant import Int4Linear

from . import interpreting, kernel_device, triton_unavailable_reason


def _attention_triton(q, k, v, mask):
    from .flash_attention import flash_attention

    return flash_attention(q, k, v, mask=mask)


def _rmsnorm_triton(x, weight, eps):
    from .rmsnorm import rmsnorm  # triton is imported only when a kernel runs

    return rmsnorm(x.contiguous(), weight, eps)


def _int4_matvec_triton(linear, x):
    from .int4_matvec import int4_matvec

    return int4_matvec(x.contiguous(), linear.packed, linear.scales, linear.offsets, linear.group_size)


def _why_not(model) -> str | None:
    reason = triton_unavailable_reason()
    if reason:
        return reason
    param = next(model.parameters())
    if param.device.type != kernel_device().type:
        return f"the model is on {param.device.type} but the kernels run on {kernel_device().type}"
    if interpreting() and param.dtype == torch.bfloat16:
        return "Triton's CPU interpreter cannot compute in bfloat16"
    return None


def use_kernels(model, impl: str = "triton"):
    """Swap attention, RMSNorm and int4 linears for Triton kernels ("triton") or back ("torch")."""
    if impl not in ("triton", "torch"):
        raise ValueError(f"kernels must be 'triton' or 'torch', got {impl!r}")
    if impl == "triton" and (reason := _why_not(model)):
        warnings.warn(f"use_kernels('triton'): {reason}; keeping the PyTorch kernels", RuntimeWarning, stacklevel=3)
        impl = "torch"
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if attn is not None and hasattr(attn, "attn_fn"):
            if impl == "triton" and attn.attn_fn is not _attention_triton:
                attn._torch_attn_fn, attn.attn_fn = attn.attn_fn, _attention_triton
            elif impl == "torch" and hasattr(attn, "_torch_attn_fn"):
                attn.attn_fn = attn.__dict__.pop("_torch_attn_fn")
        if isinstance(module, RMSNorm):           # the model's own slots for a kernel: no forward is replaced
            module.norm_fn = _rmsnorm_triton if impl == "triton" else None
        if isinstance(module, Int4Linear):        # one-token inputs only: prefill is compute-bound, a matmul
            module.matvec_fn = _int4_matvec_triton if impl == "triton" else None
    model.kernels = impl
    return model
