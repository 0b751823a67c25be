"""Save a quantized model and load it back: safetensors (tensors plus a JSON header; loading runs no
code, unlike pickle), so a model is quantized once (GPTQ/AWQ calibration takes a minute) and then
loads in a second.

    save_quantized(quantize(model, "int4"), "smollm2-int4.safetensors")
    model = load_quantized("smollm2-int4.safetensors")

Stored: each Int4Linear's packed bytes with its float16 scales and offsets, each Int8Linear's int8
weight and float32 scales, every float parameter in its own dtype (float32 or bfloat16), the model's
Config, and a layout naming each quantized linear's kind (and group size). A tied output head is
the embedding matrix itself, so it is stored once and tied again on load (safetensors refuses one
buffer under two names); an int8 head (`quantize(..., head="int8")`) is its own tensor. Everything
is checked against the header before a single weight is read: a wrong or corrupt file raises one
ModelFileError that names it and the problem.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..model.llama import Config, Transformer
from ..model.loading import ModelFileError, check_shapes
from .formats import Int4Linear, Int8Linear

FORMAT = "minillm-quantized"
KINDS = {Int4Linear: "int4", Int8Linear: "int8"}


def save_quantized(model: Transformer, path: str | Path) -> None:
    """Write a model quantized by `quantize` (its float parts as they are) to a .safetensors file."""
    layout = {name: {"kind": KINDS[type(m)], **({"group_size": m.group_size} if isinstance(m, Int4Linear) else {})}
              for name, m in model.named_modules() if type(m) in KINDS}
    if not layout:
        raise ValueError("save_quantized: the model has no quantized linear; quantize it first "
                         "(a float model is saved by train.save_checkpoint)")
    tied = isinstance(model.output, nn.Linear) and model.output.weight is model.tok_embeddings.weight
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if tied:
        state.pop("output.weight")
    metadata = {"format": FORMAT, "config": json.dumps(asdict(model.config)), "layout": json.dumps(layout),
                "tied": json.dumps(tied)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def expected_tensors(config: Config, layout: dict, tied: bool) -> dict:
    """{name: (shape, dtype or None for float)} that a file with this config and layout must hold."""
    with torch.device("meta"):
        model = Transformer(config)
    modules = dict(model.named_modules())
    expected = {name: (tuple(t.shape), None) for name, t in model.state_dict().items()}
    for name, spec in layout.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise ValueError(f"layout names {name!r}, which is not a bias-free linear of this config")
        N, K = linear.weight.shape
        del expected[f"{name}.weight"]
        if spec.get("kind") == "int4":
            g = spec.get("group_size")
            if not isinstance(g, int) or g < 1 or K % g or K % 2:
                raise ValueError(f"{name}: group_size {g!r} does not divide its {K} inputs")
            expected.update({f"{name}.packed": ((N, K // 2), torch.uint8), f"{name}.scales": ((N, K // g), torch.float16),
                             f"{name}.offsets": ((N, K // g), torch.float16)})
        elif spec.get("kind") == "int8":
            expected.update({f"{name}.weight": ((N, K), torch.int8), f"{name}.scales": ((N,), torch.float32)})
        else:
            raise ValueError(f"{name}: unknown kind {spec.get('kind')!r} (int4 or int8)")
    if tied:
        if "output" in layout or not config.tie_embeddings:
            raise ValueError("a tied head must be the float embedding of a config with tie_embeddings")
        del expected["output.weight"]
    return expected


def read_header(path):
    """(config, layout, tied, {name: (shape, dtype)}) of a quantized model file, or ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"quantized model {path} not found; write one with quant.save_quantized(model, path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            config = Config(**json.loads(meta["config"]))
            layout, tied = json.loads(meta["layout"]), json.loads(meta["tied"])
            found = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
        expected = expected_tensors(config, layout, tied)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{path} is corrupt or not a minillm quantized model ({type(e).__name__}: {e})") from None
    return config, layout, tied, found, expected


DTYPE_NAMES = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.float32: "F32"}


def load_quantized(path: str | Path, impl: str = "auto") -> Transformer:
    """Read a file written by save_quantized -> the quantized Transformer, in eval mode.

    impl: the quantized linears' kernel choice ("auto" measures and keeps the fastest, as quantize does)."""
    config, layout, tied, found, expected = read_header(path)
    check_shapes(path, {name: shape for name, (shape, _) in found.items()},
                 {name: shape for name, (shape, _) in expected.items()},
                 "the tensors do not match the file's own config and layout")
    wrong_types = [f"{n} {found[n][1]} (expected {DTYPE_NAMES[d]})" for n, (_, d) in expected.items()
                   if d is not None and found[n][1] != DTYPE_NAMES[d]]
    float_types = {found[n][1] for n, (_, d) in expected.items() if d is None}
    if wrong_types or not float_types <= {"F32", "BF16"}:
        raise ModelFileError(f"{path}: wrong tensor dtypes {wrong_types[:3] or sorted(float_types)}")
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelFileError(f"{path}: non-finite values in {bad[:3]}")
    model = Transformer(config)
    if float_types == {"BF16"}:
        model = model.bfloat16()
    for name, spec in layout.items():
        parent, _, child = name.rpartition(".")
        if spec["kind"] == "int4":
            module = Int4Linear(state[f"{name}.packed"], state[f"{name}.scales"], state[f"{name}.offsets"],
                                spec["group_size"], impl=impl)
        else:
            module = Int8Linear(state[f"{name}.weight"], state[f"{name}.scales"], impl=impl)
        setattr(model.get_submodule(parent) if parent else model, child, module)
    if not tied and isinstance(model.output, nn.Linear) and model.output.weight is model.tok_embeddings.weight:
        model.output.weight = nn.Parameter(torch.empty_like(model.output.weight))  # untie: its own weights follow
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"output.weight"} if tied else set()), (missing, unexpected)
    return model.eval()
