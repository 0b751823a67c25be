"""Turning logits into the next token, and checking what enters the decoding loop.

Sampling controls, applied in this order to a row of logits:
    temperature  0 means greedy (argmax); otherwise logits / temperature
    top_k        keep the k most likely tokens
    top_p        keep the smallest set of tokens whose probability adds up to p (nucleus sampling)
A seeded torch.Generator makes sampling reproducible.

This is the bottom of the decoding stack: it knows nothing of caches, drafters or the loop
(loop.py), so every layer above can import it.
"""
from __future__ import annotations

import math

import torch

from ..native.logits import argmax


def check_input_ids(ids, config, max_new_tokens: int = 0) -> torch.Tensor:
    """Validate a prompt where it enters: integer dtype, (B, T) shape, ids in the vocabulary, fits the context."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"input ids must be a torch.Tensor of token ids (or a list of prompts), "
                         f"got {type(ids).__name__}")
    if ids.numel() == 0 and ids.dim() <= 2:      # torch.tensor([[]]) is float32: say what is really wrong
        raise ValueError(f"the prompt is empty (shape {tuple(ids.shape)}): give at least one token")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input ids must be an integer tensor (torch.long), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"input ids must have shape (batch, tokens), got shape {tuple(ids.shape)}")
    ids = ids.long()                             # uint8 / int8 ids compared with a large vocabulary would wrap
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    bad = (ids < 0) | (ids >= config.vocab_size)
    if bad.any():
        raise ValueError(f"token id {ids[bad][0].item()} is outside the vocabulary [0, {config.vocab_size})")
    total = ids.shape[1] + max_new_tokens
    if ids.shape[1] > config.max_seq_len:
        raise ValueError(f"prompt has {ids.shape[1]} tokens; the model's context is {config.max_seq_len}")
    if total > config.max_seq_len:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's context of {config.max_seq_len}")
    return ids.long()


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Reject bad sampling settings up front, even when greedy decoding would ignore them."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return argmax(logits)             # torch.argmax's answer, on a vectorized kernel (native/logits.py)
    return torch.multinomial(probs_from_logits(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def probs_from_logits(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """The distribution sample_next draws from: (B, V) logits -> (B, V) probabilities."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)
