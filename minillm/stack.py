"""One place that builds SmolLM2 the way a command asks: dtype, quantization (with or without the head)
and a compiled decode step, in that order. The CLI and the benches call it; chapter 8 stacks on it.

    model, tok = load_stack(dtype="bfloat16", quant="int4", head="int8", compile=True)
"""
from __future__ import annotations

from .compiled import compile_decode
from .loading import load_pretrained
from .quant import DEFAULT_GROUP_SIZE, calibration_ids, quantize


def load_stack(dtype="float32", quant: str = "none", group_size: int = DEFAULT_GROUP_SIZE, head: str | None = None,
               compile: bool = False, symmetric: bool | None = None):
    """(model, tokenizer). quant: none | int8 | int4 | gptq | awq (gptq/awq calibrate on the mixture
    data/calibration.txt, 24 x 256 tokens, GPTQ with act-order: the configuration `bench quant` measured,
    a minute or two on 2 cores); head: None (float) | "int8"; compile: wrap in compile_decode;
    symmetric: int4 scales only (default True); False with group_size 32 holds the GGUF's Q4_1 weights exactly."""
    model, tok = load_pretrained("smollm2-135m", dtype=dtype)
    calibration = calibration_ids(tok, 24, 256) if quant in ("gptq", "awq") else None
    options = dict(act_order=True) if quant == "gptq" else {}
    model = quantize(model, quant, group_size=group_size, symmetric=symmetric, calibration=calibration, head=head,
                     **options)
    return (compile_decode(model) if compile else model), tok


def describe(dtype="float32", quant: str = "none", group_size: int = DEFAULT_GROUP_SIZE, head: str | None = None,
             compile: bool = False, symmetric: bool | None = None) -> str:
    """A short name for a stack: "bfloat16, int4 g64 + int8 head, compiled"."""
    parts = [str(dtype).replace("torch.", "")]
    if quant != "none":
        parts.append(quant + (f" g{group_size}" if quant != "int8" else "") + (" asym" if symmetric is False else "")
                     + (" + int8 head" if head else ""))
    elif head:
        parts.append("int8 head")
    return ", ".join(parts + (["compiled"] if compile else []))
