"""Perplexity: exp(mean negative log-likelihood of each token given the ones before it).

The text is tokenized once and cut into consecutive windows of `context` tokens; in each window every
token but the first is predicted from the tokens before it in that window (non-overlapping windows:
simple and fast; a sliding window with overlap would give every token more context and a slightly
lower number). The same windows are used for every model, so perplexities compare like with like.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..tokenization.tokenizer import Tokenizer
    from .llama import Transformer


@torch.inference_mode()
def nll_sum(model, ids: torch.Tensor, context: int = 512, batch_size: int = 4) -> tuple[float, int]:
    """Token ids (n,) -> (sum of -log p(token | window before it), number of tokens predicted)."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (one long token stream), got shape {tuple(ids.shape)}")
    if context < 2 or context > model.config.max_seq_len:
        raise ValueError(f"context must be in [2, {model.config.max_seq_len}], got {context}")
    windows = [ids[i:i + context] for i in range(0, len(ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == context]
    batches = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if len(w) != context]                   # the short last window
    for batch in batches:
        logits = model(batch)                                                    # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model: Transformer, tokenizer: Tokenizer, text: str, context: int = 512, max_tokens: int | None = None,
               return_tokens: bool = False) -> float | tuple[float, int]:
    """exp(mean NLL) of `text` under `model`; with return_tokens, (perplexity, tokens predicted)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {type(text).__name__} of length "
                         f"{len(text) if isinstance(text, str) else 'n/a'}")
    for name, value, least in (("context", context, 2), ("max_tokens", max_tokens, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be an int >= {least} (a prediction needs two tokens), got {value!r}")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    total, count = nll_sum(model, ids, context)
    ppl = math.exp(total / count)
    return (ppl, count) if return_tokens else ppl
