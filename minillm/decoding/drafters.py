"""Drafters for speculative decoding: cheap guesses of the target's next few tokens.

Every drafter, chain or tree (tree.py, medusa.py), answers the decoding loop's two calls:
    propose(context, k, hidden=None, temperature=0.0, top_k=None, top_p=None, generator=None) -> Tree
    observe(tree, logits, hidden)     after each verification (chain drafters here ignore it)
context is the whole sequence so far (list of ints); the proposal is rooted at context[-1] and
has at most k nodes past it. A chain drafter returns Tree.chain(context[-1], drafts, q), q the
(len(drafts), V) distributions they were sampled from, or None for a deterministic drafter.
Drafters keep whatever state they like (a KV cache) but must not assume that their last
proposal was accepted: the context says what was.

    NgramDrafter(n)             prompt lookup: copy what followed the last match of the context's
                                final n-gram (Saxena 2023, "prompt lookup decoding"). No model.
    ModelDrafter(model)         a small language model with the target's vocabulary, with its own cache.
    layer_skip_drafter(m, N)    ModelDrafter over the target's first N layers + its final norm and head
                                (self-speculation, as in LayerSkip / Draft & Verify): no second model.
    load_draft_model(path)      the distilled draft model (minillm/assets/smollm2_draft.safetensors).

Choosing a drafter by name ("ngram", "layerskip:N", a path) is decoding.make_drafter's job.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from ..cache.kv_cache import StaticCache
from ..model.llama import Transformer
from ..model.loading import read_checkpoint
from ..native.logits import argmax
from .sampling import probs_from_logits
from .tree import Tree


class Drafter(Protocol):
    """What the decoding loop asks of a drafter (chains here, trees in tree.py and medusa.py): up to k guesses as
    a Tree after `context`, then the target's verdict on them."""

    def propose(self, context: list[int], k: int, hidden: torch.Tensor | None = None, **sampling) -> Tree: ...

    def observe(self, tree: Tree, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> None: ...


class NgramDrafter:
    """Find the most recent earlier occurrence of the context's last n tokens (n = max_n down to
    min_n) and propose the k tokens that followed it.

    [5, 6, 7, 9, 5, 6] with max_n=2 -> the last 2-gram (5, 6) occurred at 0; propose [7, 9, 5, 6][:k].
    """

    default_len = 4  # tokens proposed per forward unless the caller says otherwise

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context, k, hidden=None, **sampling) -> Tree:
        return Tree.chain(context[-1], self.lookup(context, k))

    def observe(self, tree, logits, hidden=None):
        pass

    def lookup(self, context, k) -> list[int]:
        """The k tokens that followed the last earlier match of the context's final n-gram ([] if none)."""
        context = list(context)
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # most recent match first, not the tail itself
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k]
        return []


class ModelDrafter:
    """Draft autoregressively with a small model that shares the target's vocabulary.

    The drafter's cache holds the tokens it last saw; a new call keeps the longest prefix they share
    with the context (cache.truncate), so accepted tokens are never recomputed and rejected ones are
    dropped. stop_below: adaptive draft length -- stop drafting once the drafter's probability of
    its own next token falls below this (a confidence rule in the spirit of SpecDec++, which trains
    a head to predict acceptance; here the draft's own top probability stands in for it).
    """

    default_len = 4

    def __init__(self, model, stop_below: float | None = None, max_len: int = 2048):
        if stop_below is not None and not 0 <= stop_below <= 1:
            raise ValueError(f"stop_below must be a probability in [0, 1], got {stop_below}")
        self.model, self.stop_below = model, stop_below
        self.max_len = min(max_len, model.config.max_seq_len)
        self.cache, self.cached = None, []  # cached: the tokens whose keys/values the cache holds
        self.forwards = 0                   # draft forwards run so far (for cost accounting)

    def _sync(self, context, k):
        """Bring the cache to context[:-1] and return the logits after context[-1]; leave room for k drafts."""
        if self.cache is None or len(context) + k > self.cache.max_len:
            param = next(self.model.parameters())
            size = min(max(self.max_len, 2 * len(context)), self.model.config.max_seq_len)
            if len(context) + k > size:
                raise ValueError(f"context of {len(context)} tokens exceeds the drafter's {size}")
            self.cache, self.cached = StaticCache(self.model.config, 1, size, param.dtype, param.device), []
        keep = 0
        limit = min(len(self.cached), len(context) - 1)
        while keep < limit and self.cached[keep] == context[keep]:
            keep += 1
        self.cache.truncate(keep)
        self.cached = list(context)
        return self._step(context[keep:])

    def _step(self, tokens):
        device = next(self.model.parameters()).device
        self.forwards += 1
        return self.model(torch.tensor([tokens], device=device), cache=self.cache)[0, -1].float()  # (V,)

    def observe(self, tree, logits, hidden=None):
        pass  # the next propose() syncs the cache from the context itself

    @torch.inference_mode()
    def propose(self, context, k, hidden=None, temperature=0.0, top_k=None, top_p=None, generator=None) -> Tree:
        context = list(context)
        if k <= 0:
            return Tree.chain(context[-1], [])
        logits = self._sync(context, k)
        tokens, qs = [], []
        for i in range(k):
            probs = probs_from_logits(logits[None], temperature if temperature > 0 else 1.0, top_k, top_p)[0]  # (V,)
            if temperature == 0:
                token = int(argmax(logits))
            else:
                token = int(torch.multinomial(probs, 1, generator=generator))
            if self.stop_below is not None and i > 0 and probs[token] < self.stop_below:
                break  # the draft is unsure: the next guess would likely be rejected
            tokens.append(token)
            qs.append(probs)
            if i < k - 1:
                logits = self._step([token])
                self.cached.append(token)
        return Tree.chain(context[-1], tokens, torch.stack(qs) if temperature > 0 else None)


def early_exit_model(model: Transformer, n_layers: int) -> Transformer:
    """A Transformer whose modules are the first n_layers blocks, final norm and head of `model`
    (shared, not copied): running it is SmolLM2 stopped after n_layers layers."""
    if not 1 <= n_layers <= model.config.n_layers:
        raise ValueError(f"n_layers must be in [1, {model.config.n_layers}], got {n_layers}")
    with torch.device("meta"):  # build the skeleton without allocating or initialising weights
        early = Transformer(model.config.with_(n_layers=n_layers))
    early.tok_embeddings, early.norm, early.output = model.tok_embeddings, model.norm, model.output
    early.layers = nn.ModuleList(model.layers[:n_layers])
    return early.eval()


def layer_skip_drafter(model: Transformer, n_layers: int, stop_below: float | None = None) -> ModelDrafter:
    return ModelDrafter(early_exit_model(model, n_layers), stop_below=stop_below)


def load_draft_model(path) -> Transformer:
    """A draft model saved by data/distill_draft.py (float16 safetensors + Config JSON) -> float32 Transformer.
    Names and shapes are checked against the config on the meta device before anything is allocated;
    a file that is not such a checkpoint raises one ValueError naming it."""
    config, state = read_checkpoint(path, "minillm draft checkpoint", error=ValueError)
    model = Transformer(config)
    model.load_state_dict(state, strict=False)                     # a tied output.weight is tok_embeddings'
    return model.eval()
