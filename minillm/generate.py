"""Autoregressive generation: pick the next token, append it, repeat.

Sampling controls, applied in this order to the last position's logits:
    temperature  0 means greedy (argmax); otherwise logits / temperature
    top_k        keep the k most likely tokens
    top_p        keep the smallest set of tokens whose probability adds up to p (nucleus sampling)
A seed makes sampling reproducible: the same seed gives the same tokens.
"""
from __future__ import annotations

import torch

from .kv_cache import StaticCache
from .paged import PagedCache


def check_input_ids(ids, config, max_new_tokens: int = 0) -> torch.Tensor:
    """Validate a prompt where it enters: integer dtype, (B, T) shape, ids in the vocabulary, fits the context."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"input ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input ids must be an integer tensor (torch.long), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"input ids must have shape (batch, tokens), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
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


def sample_next(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
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


CACHES = ("none", "static", "paged")


def make_cache(kind, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
    """A fresh cache of kind "static" | "paged" (16-token blocks, room for max_len each) | "none" (None)."""
    if not isinstance(kind, str):
        return kind
    if kind == "static":
        return StaticCache(config, batch_size, max_len, dtype=dtype, device=device)
    if kind == "paged":
        cache = PagedCache(config, batch_size * -(-max_len // 16), 16, dtype=dtype, device=device)
        for _ in range(batch_size):
            cache.add_sequence()
        return cache
    return None


@torch.inference_mode()
def stream(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
           seed: int | None = None, eos_token_id="config", cache: str = "static"):
    """Yield next-token ids (B,) one step at a time. Stops when every sequence has produced EOS.

    cache="static" keeps keys and values in a preallocated buffer; cache="paged" in blocks of a
    PagedCache; cache="none" re-runs the whole sequence each step (quadratic; the reference the
    caches are tested against). A cache object (an empty QuantizedCache, EvictingCache...) is
    used as given.
    """
    config = model.config
    ids = check_input_ids(ids, config, max_new_tokens)
    if eos_token_id == "config":
        eos_token_id = config.eos_token_id
    if isinstance(cache, str) and cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES} or a cache object, got {cache!r}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    B, T = ids.shape
    param = next(model.parameters())
    kv = make_cache(cache, config, B, T + max_new_tokens, dtype=param.dtype, device=param.device)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    seq, step_input = ids, ids
    for _ in range(max_new_tokens):
        logits = model(step_input if kv is not None else seq, cache=kv)[:, -1]  # (B, V)
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
            finished |= next_ids == eos_token_id
        yield next_ids
        seq = torch.cat([seq, next_ids[:, None]], dim=1)
        step_input = next_ids[:, None]
        if finished.all():
            return


def generate(model, ids, max_new_tokens: int = 64, draft=None, draft_len: int = 4, tree=None, **kwargs) -> torch.Tensor:
    """Prompt ids (B, T) -> prompt + generated ids (B, T + n); greedy unless temperature > 0.

    Keyword arguments are those of `stream`: temperature, top_k, top_p, seed, eos_token_id, cache.
    Sequences that stop early are padded with the EOS token.
    draft: speculative decoding (speculative.py), batch size 1: "ngram", "layerskip:N", a draft
    checkpoint path or a drafter object, proposing up to draft_len tokens per target forward.
    tree: "recycling" | "medusa", tree-verified decoding (tree.py), batch size 1.
    """
    if tree is not None:
        from .tree import tree_stream

        new = list(tree_stream(model, ids, max_new_tokens, tree=tree, **kwargs))
        return torch.cat([ids.long(), torch.stack(new, dim=1)], dim=1)
    if draft is not None:
        from .drafters import make_drafter
        from .speculative import speculative_ids

        if kwargs.pop("cache", "static") != "static":
            raise ValueError("speculative decoding (draft=...) keeps its own StaticCache; leave cache at 'static'")
        return speculative_ids(model, ids, max_new_tokens, make_drafter(draft, model), draft_len, **kwargs)
    new = list(stream(model, ids, max_new_tokens, **kwargs))
    if not new:
        return ids.long()
    return torch.cat([ids.long(), torch.stack(new, dim=1)], dim=1)
