"""The decoding loop: propose -> verify in one forward -> accept -> roll the cache back. One loop
for plain, speculative (chapter 5) and tree (chapter 6) decoding, for any model the package builds.

    propose    nothing (plain decoding: a tree of one node, the last token), a chain (prompt
               lookup, layer skip, a draft model) or a tree (Token Recycling, Medusa), rooted at
               the last token
    verify     one forward over the proposal (and, in the first round, the prompt before it): a chain's mask is the causal one,
               a tree's lets each node see the prefix and its own ancestors
    accept     temperature 0: the longest path whose tokens are the model's argmax
               (tree.accept_greedy), then the argmax after it -> identical to plain greedy;
               sampling a chain: min(1, p/q) with residual resampling (speculative.accept_chain),
               distribution-exact; sampling a tree: Medusa's typical acceptance (lossy, stated)
    roll back  the cache keeps the accepted path only (truncate for a prefix, keep() otherwise)
    stop       at EOS, or after max_new_tokens

Each forward takes the tokens not yet in the cache (the prompt but its last token, in the first
round; in pieces of prefill_chunk if asked) followed by the proposal, so the prefill is simply the
first round. Invariant between rounds: the cache holds every token of the sequence but the last,
the root of the next proposal. Plain decoding takes a batch, whose prompts may differ in length
(left padding: padded slots get PAD_POSITION, which no real query attends, and each row's
positions start at its first real token, so a row computes what it would alone); rows that finish
are padded with EOS. Speculative and tree decoding take one sequence. A cache that already holds
a prefix (a shared system prompt, a forked PagedCache) is continued with continue_cache=True.

`decode_steps` yields each forward's new tokens; `stream`, `generate` and `decode` are views of it.
Not handled here: stop strings (they need the tokenizer; the CLI applies them); scheduling requests
that arrive and leave while others decode (the serving chapter does that above this loop).
"""
from __future__ import annotations

import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..assets import ASSETS
from ..cache.kv_cache import StaticCache
from ..cache.paged import PAD_POSITION, PagedCache
from .drafters import Drafter, ModelDrafter, NgramDrafter, layer_skip_drafter, load_draft_model
from .medusa import default_medusa_drafter
from .sampling import check_input_ids, check_sampling, sample_next
from .speculative import accept_chain
from .tree import MergedDrafter, TokenRecycling, Tree, accept_greedy, accept_typical, score

if TYPE_CHECKING:
    from ..model.llama import Transformer
    from ..tokenization.tokenizer import Tokenizer

CACHES = ("none", "static", "paged")
TREES = ("recycling", "recycling-dynamic", "recycling-pairs", "medusa", "lookup+recycling")
DISTILLED_DRAFT = ASSETS / "smollm2_draft.safetensors"  # made by data/distill_draft.py


def make_cache(kind, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
    """A fresh cache of kind "static" | "paged" (16-token blocks, room for max_len each) | "none" (None).
    A cache object is returned as given."""
    if not isinstance(kind, str):
        return kind
    if kind not in CACHES:
        raise ValueError(f"cache must be one of {CACHES} or a cache object, got {kind!r}")
    if kind == "static":
        return StaticCache(config, batch_size, max_len, dtype=dtype, device=device)
    if kind == "paged":
        cache = PagedCache(config, batch_size * -(-max_len // 16), 16, dtype=dtype, device=device)
        for _ in range(batch_size):
            cache.add_sequence()
        return cache
    return None


def check_draft_spec(spec: str):
    """A chain drafter's name as it stands ("ngram", "layerskip:N") or its checkpoint's path
    ("distilled", or a path); an error if it is none of them."""
    if spec == "ngram":
        return spec
    if spec.startswith("layerskip:"):
        if not spec.split(":", 1)[1].isdigit():
            raise ValueError(f"draft 'layerskip:N' needs an integer N of layers, got {spec!r}")
        return spec
    path = DISTILLED_DRAFT if spec == "distilled" else Path(spec)
    if not path.is_file():
        raise ValueError(f"draft {spec!r} is not 'ngram', 'layerskip:N', 'distilled' or an existing checkpoint file")
    return path


def make_drafter(spec, model, stop_below: float | None = None):
    """The one drafter factory. Chains: "ngram" (prompt lookup), "layerskip:N" (the model's first N
    layers), "distilled" (minillm/assets/smollm2_draft.safetensors) or a draft checkpoint path. Trees:
    "recycling" (Token Recycling; "recycling-dynamic": its tree grown best first; "recycling-pairs": that, its
    guesses keyed by the last two tokens where it has seen them), "medusa" (SmolLM2's
    committed Medusa heads), "lookup+recycling" (prompt lookup's chain and Token Recycling's tree merged into
    one tree, tree.merge). An object with `propose` is returned as given."""
    if hasattr(spec, "propose"):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"draft must be 'ngram', 'layerskip:N', 'distilled', a checkpoint path or a drafter, "
                         f"got {spec!r}")
    if spec == "ngram":
        return NgramDrafter()
    if spec in ("recycling", "recycling-dynamic", "recycling-pairs"):
        return TokenRecycling(model.config.vocab_size, dynamic=spec != "recycling",
                              context=2 if spec == "recycling-pairs" else 1)
    if spec == "medusa":
        return default_medusa_drafter(model)
    if spec == "lookup+recycling":
        return MergedDrafter(NgramDrafter(), TokenRecycling(model.config.vocab_size))
    if spec.startswith("layerskip:"):
        return layer_skip_drafter(model, int(check_draft_spec(spec).split(":", 1)[1]), stop_below)
    path = check_draft_spec(spec)
    draft = load_draft_model(path)
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({model.config.vocab_size})")
    return ModelDrafter(draft, stop_below)


@dataclass
class DecodeResult:
    """What a decoding run produced, with the statistics every benchmark reads."""
    rows: list[list[int]]                                      # new tokens of each row, EOS included if reached
    from_draft: list[bool] = field(default_factory=list)       # row 0, per token: a drafted token that was accepted
    target_forwards: int = 0                                   # forwards of the model that produced tokens, prefill included
    drafted: int = 0                                           # draft tokens (nodes past the root) proposed
    accepted: int = 0                                          # draft tokens accepted
    draft_lengths: list[int] = field(default_factory=list)     # proposal size of each verification forward
    hidden_parts: list = field(default_factory=list, repr=False)  # keep_hidden=True: final hidden states, in pieces
    prefill_seconds: float | None = None                       # from the start to the first token (time to first token)
    first_tokens: int = 0                                      # tokens the first forward gave row 0 (1, or more with a draft)
    first_token_at: float | None = None                        # time.perf_counter() when they came

    @property
    def hidden(self) -> torch.Tensor:
        """keep_hidden=True: the final hidden state of every token that entered the cache, (B, tokens, dim)."""
        if not self.hidden_parts:
            raise ValueError("no hidden states were kept: decode with keep_hidden=True")
        return torch.cat(self.hidden_parts, dim=1)

    @property
    def tokens(self) -> list[int]:
        """The new tokens of a one-row run."""
        if len(self.rows) != 1:
            raise ValueError(f"this run decoded {len(self.rows)} rows; read .rows")
        return self.rows[0]

    @property
    def verify_forwards(self) -> int:
        """Forwards after the prefill: one per round of propose -> verify -> accept."""
        return max(self.target_forwards - 1, 0)

    @property
    def accepted_per_forward(self) -> float:
        """New tokens per target forward: 1.0 for plain decoding, up to k+1 with k drafts a round."""
        return len(self.rows[0]) / max(self.target_forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def rollback(cache, start: int, path) -> None:
    """After verifying a proposal written at slots start, start + 1, ...: keep the nodes on `path`."""
    if list(path) == list(range(len(path))):      # a prefix of the proposal (always so for a chain)
        cache.truncate(start + len(path))
    else:
        cache.keep(start, [start + i for i in path])


def _stop(chunk: list[int], left: int, eos_token_id) -> list[int]:
    """The stopping rule: at most `left` more tokens, and nothing after EOS."""
    chunk = chunk[:left]
    if eos_token_id is not None and eos_token_id in chunk:
        chunk = chunk[:chunk.index(eos_token_id) + 1]
    return chunk


def _left_padded(ids, attention_mask):
    """A list of prompts of different lengths, or ids (B, T) with a left-padding attention_mask ->
    (ids (B, T) long with padding set to 0, padding (B,) leading pad columns per row)."""
    if isinstance(ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("give prompts as a list of sequences or as ids with an attention_mask, not both")
        rows = [torch.as_tensor(p).flatten() for p in ids]
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("give at least one prompt, each of at least one token")
        for r in rows:
            if r.dtype.is_floating_point or r.dtype == torch.bool:
                raise ValueError(f"prompts must hold integer token ids, got dtype {r.dtype}")
        T = max(len(r) for r in rows)
        padded = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            padded[b, T - len(r):] = r
        return padded, torch.tensor([T - len(r) for r in rows])
    if attention_mask is None:
        return ids, None
    if not isinstance(ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor) \
            or attention_mask.shape != ids.shape:
        raise ValueError(f"attention_mask must be a tensor of the ids' shape "
                         f"{tuple(getattr(ids, 'shape', ()))}, got {getattr(attention_mask, 'shape', attention_mask)!r}")
    mask = attention_mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold 1 for a token and 0 for padding")
    if (mask.diff(dim=1) < 0).any():
        bad = int((mask.diff(dim=1) < 0).any(1).nonzero()[0])
        raise ValueError(f"attention_mask row {bad} has padding after a token: pad on the left")
    if (mask.sum(1) == 0).any():
        raise ValueError(f"attention_mask row {int((mask.sum(1) == 0).nonzero()[0])} has no tokens")
    return ids.masked_fill(mask == 0, 0), (mask == 0).sum(1)


def _cache_rows(kv) -> int | None:
    """How many sequences a cache object holds, where it says."""
    if hasattr(kv, "lengths"):
        return len(kv.lengths)
    if hasattr(kv, "batch_size"):
        return kv.batch_size
    positions = getattr(kv, "positions", None)
    return positions.shape[0] if hasattr(kv, "max_len") and isinstance(positions, torch.Tensor) else None


@torch.inference_mode()
def decode_steps(model, ids, max_new_tokens: int = 64, drafter: Drafter | None = None, draft_len: int | None = None,
                 temperature: float = 0.0, top_k=None, top_p=None, seed=None, eos_token_id="config",
                 cache="static", result: DecodeResult | None = None, attention_mask=None,
                 continue_cache: bool = False, prefill_chunk: int | None = None, keep_hidden: bool = False):
    """Prompt ids (B, T) -> yields, per forward, each row's new tokens (a list of B lists).

    Each round is the four steps of the one loop, below as functions of their own: propose (nothing, a chain or a
    tree), verify (one forward), accept (a prefix of the proposal and one token of the target's), roll the cache
    back to what was accepted; plain decoding is the case with nothing proposed.

    ids: (B, T); prompts of different lengths as a list of sequences, or left-padded with an
        attention_mask (B, T) of 1 (token) and 0 (padding); each row then computes what it would alone.
    drafter: None (plain decoding), a name or an object for make_drafter; batch size 1.
    draft_len: most tokens proposed past the root per forward (default: the drafter's `default_len`,
        4 for the chain drafters, the whole template for the tree drafters).
    seed: an int, or a torch.Generator to draw from (shared across calls).
    cache: "static" | "paged" | "none" (recompute the whole sequence every forward: the quadratic
        reference the caches are tested against) | an empty cache object (QuantizedCache, ...).
    continue_cache: the cache object given already holds tokens (a prefilled shared prefix, ...), and
        ids continue each of its sequences; without it, a cache that is not empty is refused.
    prefill_chunk: at most this many prompt tokens per forward (chunked prefill: bounded memory and
        latency per forward; 1 feeds the prompt token by token, as an evicting cache needs).
    keep_hidden: collect the final hidden states of every token that entered the cache, in order
        (result.hidden, (B, tokens, dim)), padding included, as Medusa's distillation reads them.
    result: a DecodeResult to fill as the run goes (decode() returns it).
    """
    config = model.config
    ids, padding = _left_padded(ids, attention_mask)
    ids = check_input_ids(ids, config, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    if isinstance(seed, torch.Generator):
        generator = seed
    elif seed is None or (not isinstance(seed, bool) and isinstance(seed, int) and 0 <= seed < 2**63):
        generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    else:
        raise ValueError(f"seed must be an int in [0, 2**63) or a torch.Generator, got {seed!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
    if eos_token_id == "config":
        eos_token_id = config.eos_token_id
    if padding is not None and ids.shape[0] == 1:         # one row: padding is simply dropped
        ids, padding = ids[:, int(padding[0]):], None
    B, T = ids.shape
    k = 0
    if drafter is not None:
        if B != 1:
            raise ValueError(f"speculative and tree decoding take one sequence (batch size 1), got batch size {B}")
        drafter = make_drafter(drafter, model)
        if draft_len is not None and (isinstance(draft_len, bool) or not isinstance(draft_len, int)
                                      or not 0 <= draft_len <= 256):
            raise ValueError(f"draft_len must be an int in [0, 256], got {draft_len!r}")
        # a drafter's own default (chain drafters: 4), else no limit but the tokens still to produce
        k = draft_len if draft_len is not None else getattr(drafter, "default_len", None) or max_new_tokens
    param = next(model.parameters())
    if continue_cache and isinstance(cache, str):
        raise ValueError("continue_cache needs a cache object that holds the tokens to continue")
    if prefill_chunk is not None and cache == "none":
        raise ValueError("prefill_chunk needs a KV cache to hold the pieces (cache='static' or 'paged')")
    # T + max_new_tokens is enough: a proposal never has more nodes than tokens still to produce
    size = T + max_new_tokens
    size = max(model.cache_len(size), size) if hasattr(model, "cache_len") else size  # compiled: a few sizes only
    kv = make_cache(cache, config, B, size, param.dtype, param.device)
    base = torch.zeros(B, dtype=torch.long)              # tokens each row's cache holds before ids
    if kv is not None and continue_cache:
        lengths = getattr(kv, "lengths", [kv.length] * (_cache_rows(kv) or B))
        if len(lengths) != B:
            raise ValueError(f"the cache holds {len(lengths)} sequences, the prompt has {B} rows")
        base = torch.tensor(lengths, dtype=torch.long)
        if int(base.max()) + T + max_new_tokens > config.max_seq_len:
            raise ValueError(f"the cache's {int(base.max())} tokens + prompt ({T}) + max_new_tokens "
                             f"({max_new_tokens}) exceed the model's context of {config.max_seq_len}")
        if drafter is not None and not (kv.length == base).all():
            raise ValueError("speculative and tree decoding continue a cache only at one length")
    elif kv is not None and kv.length != 0:
        raise ValueError(f"the cache given must be empty, it holds {kv.length} tokens "
                         f"(continue_cache=True continues it)")
    elif kv is not None and (_cache_rows(kv) or B) != B:
        raise ValueError(f"the cache given holds {_cache_rows(kv)} sequences, the prompt has {B} rows")
    # Rows of different lengths, or a cache whose rows differ: every forward gets explicit positions
    ragged = padding is not None or bool((base != base[0]).any())
    padding = padding if padding is not None else torch.zeros(B, dtype=torch.long)

    def positions(col: int, n: int):
        """RoPE positions of the columns [col, col + n) of seq; padding -> PAD_POSITION (never attended)."""
        c = torch.arange(col, col + n)
        pos = (base[:, None] + c - padding[:, None]).masked_fill(c < padding[:, None], PAD_POSITION)
        return pos.to(ids.device)

    result = result if result is not None else DecodeResult(rows=[])
    started = time.perf_counter()
    result.rows, result.prefill_seconds, result.first_tokens = [[] for _ in range(B)], None, 0
    result.hidden_parts = []
    fed = kept = 0      # columns of seq in the cache; columns whose hidden state was kept
    seq, finished, last_hidden, first = ids, [False] * B, None, True

    def forward(tokens, col: int):
        """One forward over the columns [col, col + width) of seq -> logits, hidden."""
        out = model(tokens, positions(col, tokens.shape[1]) if ragged else None, cache=kv, return_hidden=True)
        result.target_forwards += 1
        return out

    def keep(hidden, col):
        """hidden (B, n, dim) of the columns col, col + 1, ... that are now in the cache."""
        nonlocal kept
        if keep_hidden and col + hidden.shape[1] > kept:
            result.hidden_parts.append(hidden[:, kept - col:])
            kept = col + hidden.shape[1]

    def observe_prompt(tokens, logits, hidden):
        """Token Recycling learns from the prompt: on the first round the drafter sees the prompt's columns."""
        if first and drafter is not None and tokens.shape[1]:
            drafter.observe(Tree.chain(tokens[0, 0], tokens[0, 1:]), logits[0], hidden[0])

    def prefill(pending):
        """Feed what the verify step will not take: a long prompt in chunks (prefill_chunk) and, with a compiled
        step, the whole prompt in a forward of its own, so that the first step's width is the same with and
        without a drafter (plain == speculative) -> what is still pending."""
        nonlocal fed
        if prefill_chunk is not None:
            while pending.shape[1] and pending.shape[1] + 1 > prefill_chunk:
                piece = pending[:, :prefill_chunk]
                logits, hidden = forward(piece, fed)
                observe_prompt(piece, logits, hidden)
                keep(hidden, fed)
                fed, pending = fed + piece.shape[1], pending[:, prefill_chunk:]
        if pending.shape[1] and getattr(model, "prefill_apart", lambda kv: False)(kv):
            logits, hidden = forward(pending, fed)
            observe_prompt(pending, logits, hidden)
            keep(hidden, fed)
            fed, pending = fed + pending.shape[1], pending[:, :0]
        return pending

    def propose(roots, pending):
        """1. The drafter's guesses after the last token, a chain or a tree rooted at it (None: plain decoding)."""
        if drafter is None:
            return None
        n = min(k, max_new_tokens - len(result.rows[0]) - 1)         # the forward adds (accepted + 1) tokens
        if kv is not None and hasattr(kv, "max_len"):                # never overflow a cache that was given
            n = min(n, kv.max_len - kv.length - pending.shape[1] - 1)
        if hasattr(model, "widths"):                                 # compiled: no wider than its widest graph
            n = min(n, max(model.widths) - pending.shape[1] - 1)
        tree = drafter.propose(seq[0].tolist(), n, last_hidden, temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator) if n > 0 else Tree.chain(roots[0], [])
        tree = tree.prefix(n + 1)
        if tree.tokens[0] != roots[0]:
            raise ValueError(f"{type(drafter).__name__} proposed a tree rooted at {tree.tokens[0]}, not at the "
                             f"last token {roots[0]}")
        return tree

    def verify(tree, roots, pending):
        """2. One forward over what is pending and the proposal -> the proposal's logits and hidden states, the
        hidden states to keep, and the cache slot where the proposal's nodes start."""
        if tree is not None and not tree.is_chain():                 # a tree: its own mask and positions
            if kv is None:
                raise ValueError("tree drafters need a KV cache (cache='static' or 'paged'), got cache='none'")
            if pending.shape[1]:                                     # the prompt goes in first
                prefix_logits, prefix_hidden = forward(pending, fed)
                observe_prompt(pending, prefix_logits, prefix_hidden)
                keep(prefix_hidden, fed)
            start = kv.length
            logits, hidden = score(model, kv, tree)                  # (N, V), (N, dim)
            result.target_forwards += 1
            return logits, hidden, hidden[None], start
        nodes = torch.tensor([[r] + (tree.tokens[1:] if tree is not None else []) for r in roots],
                             device=ids.device)                      # a chain (or nothing) after `pending`: (B, N)
        logits, hidden = forward(torch.cat([pending, nodes], dim=1), fed)
        P = pending.shape[1]
        observe_prompt(pending, logits[:, :P], hidden[:, :P])
        keep(hidden[:, :P], fed)
        logits, hidden = logits[:, P:], hidden[:, P:]
        return logits, hidden, hidden, (kv.length - nodes.shape[1] if kv is not None else None)

    def accept(tree, logits, hidden):
        """3. Plain decoding samples one token a row; with a drafter, the draft's prefix the target accepts plus one
        token of the target's own -> (accepted node indices, each row's new tokens, which came from the draft,
        the proposal's logits and hidden states, one row's where the proposal was a chain)."""
        if drafter is None:
            chunks = [[t] for t in sample_next(logits[:, -1], temperature, top_k, top_p, generator).tolist()]
            return [0], chunks, [False], logits, hidden
        if tree.is_chain():
            logits, hidden = logits[0], hidden[0]
        if len(tree) == 1:
            path, extra = [0], int(sample_next(logits[-1:], temperature, top_k, top_p, generator))
        elif temperature == 0:
            path, extra = accept_greedy(tree, logits)
        elif tree.is_chain():
            m, extra = accept_chain(tree.tokens[1:], tree.q, logits, temperature, top_k, top_p, generator)
            path = list(range(m + 1))
        else:
            path, extra = accept_typical(tree, logits, temperature, generator=generator, top_k=top_k, top_p=top_p)
        chunks = [[tree.tokens[i] for i in path[1:]] + [extra]]
        return path, chunks, [True] * (len(path) - 1) + [False], logits, hidden

    while True:
        roots = seq[:, -1].tolist()                                  # the last token of each row
        pending = prefill(seq[:, fed:-1])  # not yet in the cache (the prompt in the first round; all with cache="none")
        tree = propose(roots, pending)
        logits, hidden, nodes_hidden, start = verify(tree, roots, pending)
        first = False
        path, chunks, flags, logits, hidden = accept(tree, logits, hidden)
        if drafter is not None:
            if kv is not None:                                       # 4. roll the cache back to the accepted path
                rollback(kv, start, path)
            drafter.observe(tree, logits, hidden)
            result.drafted += len(tree) - 1
            result.accepted += len(path) - 1
            result.draft_lengths.append(len(tree) - 1)
            last_hidden = hidden[path[-1]]
        if keep_hidden:                                              # the accepted nodes entered the cache
            keep(nodes_hidden[:, path], seq.shape[1] - 1)

        left = max_new_tokens - len(result.rows[0])                  # stop
        for b in range(B):          # a finished row of a batch repeats EOS until every row is done
            chunks[b] = [eos_token_id] * len(chunks[b]) if finished[b] else _stop(chunks[b], left, eos_token_id)
        chunks = [c[:len(chunks[0])] for c in chunks]
        for b in range(B):
            result.rows[b] += chunks[b]
            finished[b] = finished[b] or (eos_token_id is not None and eos_token_id in chunks[b])
        result.from_draft += flags[:len(chunks[0])]
        if result.prefill_seconds is None:
            result.first_token_at = time.perf_counter()
            result.prefill_seconds, result.first_tokens = result.first_token_at - started, len(chunks[0])
        yield chunks
        if len(result.rows[0]) >= max_new_tokens or all(finished):
            return
        seq = torch.cat([seq, torch.tensor(chunks, device=ids.device)], dim=1)
        fed = seq.shape[1] - 1 if kv is not None else 0


def decode(model: Transformer, ids: torch.Tensor | list[int] | list[list[int]] | str, max_new_tokens: int = 64,
           drafter: Drafter | None = None, draft_len: int | None = None, **kwargs) -> DecodeResult:
    """Run decode_steps to the end; return the new tokens and the statistics (DecodeResult)."""
    result = DecodeResult(rows=[])
    for _ in decode_steps(model, ids, max_new_tokens, drafter, draft_len, result=result, **kwargs):
        pass
    return result


def stream(model: Transformer, ids: torch.Tensor | list[int] | list[list[int]] | str, max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_token_id: int | str | None = "config", cache: str | StaticCache | PagedCache | None = "static",
           draft: str | None = None,
           draft_len: int | None = None, tree: str | None = None, **kwargs) -> Iterator[torch.Tensor]:
    """Yield next-token ids (B,) one token at a time. Stops when every sequence has produced EOS.

    cache="static" keeps keys and values in a preallocated buffer; cache="paged" in blocks of a
    PagedCache; cache="none" re-runs the whole sequence each step. draft / tree: as in generate;
    other keyword arguments (attention_mask, prefill_chunk, ...) as in decode_steps.
    """
    drafter = _drafter_from(draft, tree)
    device = ids.device if isinstance(ids, torch.Tensor) else None
    for chunks in decode_steps(model, ids, max_new_tokens, drafter, draft_len, temperature, top_k, top_p, seed,
                               eos_token_id, cache, **kwargs):
        for i in range(len(chunks[0])):
            yield torch.tensor([c[i] for c in chunks], device=device)


def check_stop(stop) -> list[str]:
    """Stop strings as a list: None, one non-empty string or a list of them."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stop


def visible_text(text: str, stop=(), finished: bool = False) -> tuple[str, bool]:
    """(what a reader may see of generated `text` now, whether a stop string was reached).

    Cut before the first stop string; while generation goes on, also hold back an incomplete UTF-8
    character (decoded as U+FFFD) and any tail that may still grow into a stop string."""
    cuts = [text.index(s) for s in stop if s in text]
    if cuts:
        return text[:min(cuts)], True
    if finished:
        return text, False
    text = text.rstrip("\ufffd")
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False


def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], max_new_tokens: int = 64,
                chat: bool = False, stop: str | list[str] | None = None, **kwargs) -> Iterator[str]:
    """Yield the new text as it is generated, in pieces that never cut a UTF-8 character in two (a
    character spread over several tokens comes out whole once its last token is in); EOS is not shown.

    prompt: a string, encoded with tokenizer.encode (special-token text is refused, as tiktoken does),
        or with chat=True wrapped in the chat template as the user's message (tokenizer.encode_chat:
        the message stays plain text); or a list of token ids, used as is.
    stop: a string or a list of them; generation ends where one appears, and the text stops just
        before it (a tail that might still become a stop string is held back until it cannot).
    Keyword arguments are decode_steps' (temperature, seed, draft via drafter=..., result=..., ...).
        stream_text(model, tok, "Once upon a time", 16) -> ",", " there", " was", ...
    """
    stop = check_stop(stop)
    if isinstance(prompt, str):
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    elif chat:
        raise ValueError("chat=True takes the user's message as a string, not token ids")
    else:
        ids = list(prompt)
    eos = model.config.eos_token_id if kwargs.get("eos_token_id", "config") == "config" else kwargs["eos_token_id"]
    new, shown = [], ""
    for chunks in decode_steps(model, torch.tensor([ids]), max_new_tokens, **kwargs):
        new += [t for t in chunks[0] if t != eos]
        text, stopped = visible_text(tokenizer.decode(new), stop)
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
        if stopped:
            return
    text, _ = visible_text(tokenizer.decode(new), stop, finished=True)
    if len(text) > len(shown):            # what an incomplete character or a held-back tail left at the end
        yield text[len(shown):]


def generate(model: Transformer, ids: torch.Tensor | list[int] | list[list[int]] | str, max_new_tokens: int = 64, draft: str | None = None,
             draft_len: int | None = None, tree: str | None = None, tokenizer: Tokenizer | None = None,
             **kwargs) -> torch.Tensor | str:
    """Prompt ids (B, T) -> prompt + generated ids (B, T + n); greedy unless temperature > 0.

    What comes back has the prompt's form:
        ids (B, T) tensor                     -> (B, T + n), rows that stop early padded with EOS;
        one prompt: a 1-D tensor or a list of ints (what tokenizer.encode returns)
                                              -> a 1-D tensor, the prompt + its new tokens up to EOS;
        several prompts of different lengths, a list of sequences
                                              -> a list of 1-D tensors, each up to its EOS (no padding);
        text, a string or a list of strings (needs tokenizer=, whose encode refuses special-token text)
                                              -> the prompt + its completion as text, EOS not shown.
    Keyword arguments are those of decode_steps: temperature, top_k, top_p, seed, eos_token_id, cache,
    attention_mask (left padding, HF's convention), prefill_chunk, continue_cache.
    draft: speculative decoding (chapter 5), batch size 1: "ngram", "layerskip:N", "distilled", a
        draft checkpoint path or a drafter object, proposing up to draft_len (default 4) tokens a forward.
    tree: "recycling" | "recycling-dynamic" | "recycling-pairs" | "medusa" | "lookup+recycling" | a tree drafter, tree-verified
        decoding (chapter 6), batch 1.
    At temperature 0 every choice gives the same tokens as plain greedy decoding.
        generate(model, "The capital of France is", 8, tokenizer=tok) -> "The capital of France is Paris..."
    """
    eos = model.config.eos_token_id if kwargs.get("eos_token_id", "config") == "config" else kwargs["eos_token_id"]
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and any(isinstance(p, str) for p in ids)):
        texts = [ids] if isinstance(ids, str) else list(ids)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("give prompts as all text or all token ids, not a mix")
        if tokenizer is None:
            raise ValueError("a text prompt needs the model's tokenizer: generate(model, text, tokenizer=tok); "
                             "or give token ids")
        encoded = [tokenizer.encode(t) for t in texts]
        rows = generate(model, encoded, max_new_tokens, draft, draft_len, tree, **kwargs)
        done = [t + tokenizer.decode([i for i in row[len(e):].tolist() if i != eos])
                for t, e, row in zip(texts, encoded, rows)]
        return done[0] if isinstance(ids, str) else done
    one = isinstance(ids, torch.Tensor) and ids.dim() == 1 or (
        isinstance(ids, (list, tuple)) and len(ids) > 0 and all(isinstance(i, numbers.Integral) for i in ids))
    if one:                                   # one prompt: not a batch of one-token prompts
        return generate(model, [ids], max_new_tokens, draft, draft_len, tree, **kwargs)[0]
    rows = decode(model, ids, max_new_tokens, _drafter_from(draft, tree), draft_len, **kwargs).rows
    if isinstance(ids, (list, tuple)):
        rows = [r[:r.index(eos) + 1] if eos is not None and eos in r else r for r in rows]
        return [torch.cat([torch.as_tensor(p).flatten().long(), torch.tensor(r, dtype=torch.long)])
                for p, r in zip(ids, rows)]
    return torch.cat([ids.long(), torch.tensor(rows, dtype=torch.long, device=ids.device)], dim=1)


def _drafter_from(draft, tree):
    if draft is not None and tree is not None:
        raise ValueError("give draft (a chain drafter) or tree (a tree drafter), not both")
    if tree is not None and isinstance(tree, str) and tree not in TREES:
        raise ValueError(f"tree must be one of {TREES} or a tree drafter, got {tree!r}")
    return draft if draft is not None else tree


# Old names, kept for one release: speculative_generate(target, ids, n, drafter, k) is decode(...).
speculative_generate = decode
SpecResult = DecodeResult
