"""Smaller KV caches at some cost in quality: eviction policies, and how to measure what they cost.

EvictingCache keeps at most `budget` tokens per layer (plus those of the forward in progress) and,
before each forward, evicts down to the budget by one of two policies:
    "streaming"  attention sinks + recent window (StreamingLLM): the first n_sink tokens, which
                 soak up attention mass whatever they say, and the newest budget - n_sink tokens
    "h2o"        heavy hitters + recent window (H2O): the newest budget // 2 tokens and, of the
                 rest, those that have received the most attention so far (summed over heads and queries)

H2O needs attention weights, which the fused attention never materialises. Rather than slow every
forward, `with cache.observe(model):` wraps each layer's attn_fn to recompute softmax(q k^T) on the
side and add it to the cache's scores; without it the model runs unchanged.

Simplifications, stated: keys keep the RoPE rotation of their original position (StreamingLLM
re-numbers positions inside the cache, which matters beyond the trained context; we stay inside it);
H2O scores are per layer, shared by the KV heads of that layer (the paper keeps them per head).
int8 quantization (QuantizedCache) is in kv_cache.py.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F


class EvictingCache:
    def __init__(self, config, batch_size: int, budget: int, policy: str = "streaming", n_sink: int = 4,
                 dtype=torch.float32, device="cpu"):
        if policy not in ("streaming", "h2o"):
            raise ValueError(f"policy must be 'streaming' or 'h2o', got {policy!r}")
        if budget < 2 or (policy == "streaming" and budget <= n_sink):
            raise ValueError(f"budget must be >= 2 and > n_sink={n_sink} for streaming, got {budget}")
        self.budget, self.policy, self.n_sink = budget, policy, n_sink
        L = config.n_layers
        self.k, self.v = [None] * L, [None] * L                # (B, nkv, S, hd) per layer
        self.pos, self.score = [None] * L, [None] * L          # (B, S) position and attention received
        self.batch_size, self.device = batch_size, device
        self.length = 0                                        # tokens seen (positions continue from here)

    def _keep_indices(self, layer: int) -> torch.Tensor:
        """Which of the S stored slots survive: (B, budget) indices in increasing order."""
        S, B = self.pos[layer].shape[1], self.batch_size
        if self.policy == "streaming":
            recent = self.budget - self.n_sink
            idx = torch.cat([torch.arange(self.n_sink), torch.arange(S - recent, S)])
            return idx.to(self.pos[layer].device).expand(B, -1)
        recent = self.budget // 2
        older = self.score[layer][:, :S - recent]                                  # (B, S - recent)
        heavy = older.topk(self.budget - recent, dim=-1).indices                   # (B, budget - recent)
        recent_idx = torch.arange(S - recent, S, device=heavy.device).expand(B, -1)
        return torch.cat([heavy, recent_idx], dim=1).sort(dim=1).values

    def _evict(self, layer: int):
        idx = self._keep_indices(layer)                                            # (B, budget)
        kv_idx = idx[:, None, :, None].expand(-1, self.k[layer].shape[1], -1, self.k[layer].shape[3])
        self.k[layer] = self.k[layer].gather(2, kv_idx)
        self.v[layer] = self.v[layer].gather(2, kv_idx)
        self.pos[layer] = self.pos[layer].gather(1, idx)
        self.score[layer] = self.score[layer].gather(1, idx)

    def begin(self, positions):
        for layer in range(len(self.k)):
            if self.pos[layer] is not None and self.pos[layer].shape[1] > self.budget:
                self._evict(layer)
        self._new_positions = positions
        self.length += positions.shape[1]
        if self.pos[0] is None:
            return positions
        # Layers may keep different tokens (H2O), but every kept token is older than every new one,
        # so layer 0's positions give every layer the same causal mask.
        return torch.cat([self.pos[0], positions], dim=1)

    def update(self, layer: int, k, v):
        new_pos = self._new_positions
        new_score = torch.zeros(new_pos.shape, dtype=torch.float32, device=new_pos.device)
        if self.k[layer] is None:
            self.k[layer], self.v[layer], self.pos[layer], self.score[layer] = k, v, new_pos, new_score
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
            self.pos[layer] = torch.cat([self.pos[layer], new_pos], dim=1)
            self.score[layer] = torch.cat([self.score[layer], new_score], dim=1)
        return self.k[layer], self.v[layer]

    def add_attention(self, layer: int, q, k, mask):
        """Accumulate the attention each key received: q (B, nh, T, hd), k (B, nh, S, hd)."""
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        self.score[layer] += probs.sum(dim=(1, 2))                                  # (B, S)

    @contextmanager
    def observe(self, model):
        """Within this block, attention weights of `model` feed the H2O scores."""
        originals = [layer.attn.attn_fn for layer in model.layers]

        def wrap(i, fn):
            def attn_fn(q, k, v, mask):
                self.add_attention(i, q, k, mask)
                return fn(q, k, v, mask)
            return attn_fn

        for i, layer in enumerate(model.layers):
            layer.attn.attn_fn = wrap(i, originals[i])
        try:
            yield self
        finally:
            for layer, fn in zip(model.layers, originals):
                layer.attn.attn_fn = fn

    def truncate(self, length: int):
        """Roll back to the first `length` tokens seen; possible only while those after it are all still kept."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache that has seen {self.length} tokens to {length}")
        for layer in range(len(self.k)):
            if self.pos[layer] is None:
                continue
            keep = self.pos[layer][0] < length
            if int((~keep).sum()) != self.length - length:
                raise ValueError(f"cannot roll back to {length}: some of the last {self.length - length} "
                                 f"tokens were already evicted")
            self.k[layer], self.v[layer] = self.k[layer][:, :, keep], self.v[layer][:, :, keep]
            self.pos[layer], self.score[layer] = self.pos[layer][:, keep], self.score[layer][:, keep]
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@torch.inference_mode()
def teacher_forced(model, ids, make_cache, chunk: int | None = None):
    """Run the text `ids` (1, L) through the model with a fresh cache; return (perplexity, argmax (L-1,), cache).

    The first `chunk` tokens go in one forward (all of them when chunk is None); then one token per
    forward, as in decoding, so that an evicting cache evicts as it would while generating.
    H2O caches are observed automatically.
    """
    cache = make_cache()
    chunk = ids.shape[1] if chunk is None else min(chunk, ids.shape[1])
    ctx = cache.observe(model) if getattr(cache, "policy", None) == "h2o" else nullcontext()
    with ctx:
        pieces = [model(ids[:, :chunk], cache=cache)]
        for t in range(chunk, ids.shape[1]):
            pieces.append(model(ids[:, t:t + 1], cache=cache))
    logits = torch.cat(pieces, dim=1)[0, :-1]                       # (L-1, V) predicts ids[1:]
    nll = F.cross_entropy(logits.float(), ids[0, 1:])
    return math.exp(nll.item()), logits.argmax(-1), cache


def greedy_prefix_agreement(reference, candidate) -> int:
    """How many leading tokens two generations share: [5, 6, 7] vs [5, 6, 9] -> 2."""
    n = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        n += 1
    return n
