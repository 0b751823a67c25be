"""Weight-only quantization (chapter 3): formats and RTN at the bottom, GPTQ and AWQ built on them,
and `quantize`, the one entry point that dispatches to all three.

    formats.py      group-wise scales, RTN, int4 packing, Int4Linear / Int8Linear, the module handler
    calibration.py  calibration text and the per-block inputs GPTQ and AWQ fit to
    gptq.py         GPTQ: quantize column by column, pushing each rounding error onto later columns
    awq.py          AWQ: scale salient input channels up before rounding
    storage.py      save_quantized / load_quantized: a quantized model in a safetensors file

    from minillm.quant import quantize, calibration_ids
    quantize(model, "int4")                       # RTN, group size 64, symmetric
    quantize(model, "gptq", calibration=calibration_ids(tok, 8, 256))
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .awq import awq_quantize_model
from .calibration import calibration_ids
from .formats import (
    DEFAULT_IMPL,
    Int4Linear,
    Int8Linear,
    QuantLinear,
    check_groups,
    dequantize_groups,
    fake_quantize,
    group_params,
    kernels_used,
    model_bytes,
    pack_int4,
    quantize_groups,
    quantize_groups_ref,
    quantize_with,
    replace_linears,
    set_impl,
    unpack_int4,
)
from .gptq import gptq_quantize_model
from .storage import load_quantized, save_quantized

if TYPE_CHECKING:
    from ..model.llama import Transformer

METHODS = ("none", "int8", "int4", "gptq", "awq")
# SmolLM2's widths are 576 and 1536: 576 = 4.5 x 128, so the usual "g128" cannot be used; 64 divides both.
DEFAULT_GROUP_SIZE = 64


@torch.no_grad()
def quantize(model: Transformer, method: str = "int8", group_size: int = DEFAULT_GROUP_SIZE,
             symmetric: bool | None = None, calibration: torch.Tensor | None = None, head: str | None = None,
             **options) -> Transformer:
    """Quantize `model`'s transformer linears in place and return it. The embedding stays float; the
    output head too unless head="int8" (per-channel RTN, the head then no longer shares the embedding's storage).

    method: "int8" (RTN, per channel) | "int4" (RTN, groups) | "gptq" | "awq" (int4; need `calibration`,
    token ids (n, T) disjoint from your evaluation text). symmetric defaults to True (absmax) for int4 methods.
    Every layer is checked before any is replaced: the call either quantizes the whole model or changes nothing.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if head not in (None, "int8"):
        raise ValueError(f"head must be None (float) or 'int8', got {head!r}")
    if head is not None and not isinstance(getattr(model, "output", None), nn.Linear):
        raise ValueError(f"head='int8' needs a float nn.Linear output head, got {type(getattr(model, 'output', None)).__name__}")
    symmetric = True if symmetric is None else symmetric
    model = _quantize_body(model, method, group_size, symmetric, calibration, **options)
    if head == "int8":
        model.output = Int8Linear.from_linear(model.output)
    return model


def _quantize_body(model, method, group_size, symmetric, calibration, **options):
    if method == "none":
        return model
    if method != "int8":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "output":
                try:
                    check_groups(module.weight, group_size)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
    if method == "int8":
        return replace_linears(model, lambda name, lin: Int8Linear.from_linear(lin))
    if method == "int4":
        return replace_linears(model, lambda name, lin: Int4Linear.from_linear(lin, group_size, symmetric))
    if calibration is None:
        raise ValueError(f"method {method!r} needs calibration token ids (n_samples, seq_len), got None")
    if method == "gptq":
        return gptq_quantize_model(model, calibration, group_size=group_size, symmetric=symmetric, **options)
    return awq_quantize_model(model, calibration, group_size=group_size, symmetric=symmetric, **options)


__all__ = ["quantize", "save_quantized", "load_quantized", "METHODS", "DEFAULT_GROUP_SIZE", "calibration_ids", "gptq_quantize_model",
           "awq_quantize_model", "DEFAULT_IMPL", "Int4Linear", "Int8Linear", "QuantLinear", "check_groups",
           "dequantize_groups", "fake_quantize", "group_params", "kernels_used", "model_bytes", "pack_int4", "quantize_groups",
           "quantize_groups_ref", "quantize_with", "replace_linears", "set_impl", "unpack_int4"]
