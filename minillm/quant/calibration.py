"""Calibration for GPTQ and AWQ: which text they see, and what each block's linears receive.

    calibration_ids(tok, n, T)   n windows of T tokens from minillm/assets/calibration.txt, a mixture made by
                                 data/make_calibration.py: SmolLM2's own answers to varied prompts,
                                 Shakespeare and Python code (requests), an equal share of windows
                                 from each; source=a text file's path: windows spread over it (chapter 3
                                 starts from the plays alone). The mixture is disjoint from the
                                 evaluation texts minillm/assets/heldout.txt and minillm/assets/heldout_code.txt
    block_inputs(model, ids)     what the first block receives (hidden states, RoPE, causal mask)
    collect_inputs(block, ...)   every Linear's inputs while the block runs (forward hooks)

Not handled: choosing the mixture for a workload (calibrate on text like what you serve).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..assets import ASSETS
from ..model.llama import rope_cos_sin

CALIBRATION = ASSETS / "calibration.txt"


def _windows(tokenizer, text: str, n: int, seq_len: int) -> list[list[int]]:
    """n windows of seq_len tokens at evenly spaced places in `text`."""
    ids = tokenizer.encode(text, disallowed_special=())
    if len(ids) < seq_len:
        raise ValueError(f"calibration text of {len(ids)} tokens is shorter than one window of {seq_len}")
    return [ids[i * (len(ids) - seq_len) // max(n - 1, 1):][:seq_len] for i in range(n)]


def calibration_parts() -> dict[str, str]:
    """minillm/assets/calibration.txt split at its `### part: NAME` lines -> {name: text}."""
    text = CALIBRATION.read_text(encoding="utf-8")
    parts = {}
    for chunk in text.split("### part: ")[1:]:
        name, body = chunk.split("\n", 1)
        parts[name.strip()] = body
    return parts


def calibration_ids(tokenizer, n_samples: int, seq_len: int, source: str | Path = "mixture") -> torch.Tensor:
    """(n_samples, seq_len) token ids: from the packaged mixture, an equal share of windows from each part
    (the first parts take one more when n_samples does not divide); from a text file's path, windows
    evenly spaced over it."""
    if source != "mixture":
        if not Path(source).is_file():
            raise ValueError(f"calibration source must be 'mixture' or a text file's path, got {str(source)!r}")
        text = Path(source).read_text(encoding="utf-8")
        chars = seq_len * 16                                                  # plenty of characters per window
        starts = [i * (len(text) - chars) // n_samples for i in range(n_samples)]
        windows = [tokenizer.encode(text[s:s + chars])[:seq_len] for s in starts]
        if min(map(len, windows)) < seq_len:
            raise ValueError(f"a calibration window gave {min(map(len, windows))} tokens, need {seq_len}")
        return torch.tensor(windows)
    parts = list(calibration_parts().values())
    counts = [n_samples // len(parts) + (i < n_samples % len(parts)) for i in range(len(parts))]
    return torch.tensor([w for part, n in zip(parts, counts) if n for w in _windows(tokenizer, part, n, seq_len)])


def block_inputs(model, ids):
    """Token ids (n, T) -> what the first block receives: hidden x (n, T, dim), RoPE cos/sin, causal mask."""
    n, T = ids.shape
    positions = torch.arange(T).expand(n, T)
    cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta)
    mask = positions[:, None, None, :] <= positions[:, None, :, None]                 # (n, 1, T, T)
    return model.tok_embeddings(ids), cos, sin, mask


def check_calibration(model, calibration) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype.is_floating_point:
        got = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be integer token ids of shape (n_samples, seq_len), got {got}")
    if int(calibration.max()) >= model.config.vocab_size or int(calibration.min()) < 0:
        raise ValueError(f"calibration ids must be in [0, {model.config.vocab_size})")
    return calibration.long()


def collect_inputs(block, x, cos, sin, mask, batch: int = 4):
    """Run the block over x in batches, recording each Linear's inputs: {name: (tokens, K)}; returns (inputs, y)."""
    inputs, hooks = {}, []
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    try:
        y = torch.cat([block(x[i:i + batch], cos[i:i + batch], sin[i:i + batch], mask[i:i + batch])
                       for i in range(0, x.shape[0], batch)])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}, y
