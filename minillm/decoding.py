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
round) followed by the proposal, so the prefill is simply the first round. Invariant between
rounds: the cache holds every token of the sequence but the last, the root of the next proposal. Plain decoding takes a batch (rows padded with EOS
once they finish); speculative and tree decoding take one sequence.

`decode_steps` yields each forward's new tokens; `stream`, `generate` and `decode` are views of it.
Not handled here: stop strings (they need the tokenizer; the CLI applies them), batches of
prompts of different lengths (paged.generate_batch pads by position).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .drafters import ModelDrafter, NgramDrafter, layer_skip_drafter, load_draft_model
from .kv_cache import StaticCache
from .medusa import default_medusa_drafter
from .paged import PagedCache
from .sampling import check_input_ids, check_sampling, sample_next
from .speculative import accept_chain
from .tree import Tree, TokenRecycling, accept_greedy, accept_typical, score

CACHES = ("none", "static", "paged")
TREES = ("recycling", "medusa")
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DISTILLED_DRAFT = DATA_DIR / "smollm2_draft.safetensors"  # made by data/distill_draft.py


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


def make_drafter(spec, model, stop_below: float | None = None):
    """The one drafter factory. Chains: "ngram" (prompt lookup), "layerskip:N" (the model's first N
    layers), "distilled" (data/smollm2_draft.safetensors) or a draft checkpoint path. Trees:
    "recycling" (Token Recycling), "medusa" (SmolLM2's committed Medusa heads). An object with
    `propose` is returned as given."""
    if hasattr(spec, "propose"):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"draft must be 'ngram', 'layerskip:N', 'distilled', a checkpoint path or a drafter, "
                         f"got {spec!r}")
    if spec == "ngram":
        return NgramDrafter()
    if spec == "recycling":
        return TokenRecycling(model.config.vocab_size)
    if spec == "medusa":
        return default_medusa_drafter(model)
    if spec.startswith("layerskip:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit():
            raise ValueError(f"draft 'layerskip:N' needs an integer N of layers, got {spec!r}")
        return layer_skip_drafter(model, int(n), stop_below)
    path = DISTILLED_DRAFT if spec == "distilled" else Path(spec)
    if not path.is_file() and not path.is_absolute() and (DATA_DIR.parent / path).is_file():
        path = DATA_DIR.parent / path  # "data/..." works from any directory
    if not path.is_file():
        raise ValueError(f"draft {spec!r} is not 'ngram', 'layerskip:N', 'distilled' or an existing checkpoint file")
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


@torch.inference_mode()
def decode_steps(model, ids, max_new_tokens: int = 64, drafter=None, draft_len: int | None = None,
                 temperature: float = 0.0, top_k=None, top_p=None, seed: int | None = None, eos_token_id="config",
                 cache="static", result: DecodeResult | None = None):
    """Prompt ids (B, T) -> yields, per forward, each row's new tokens (a list of B lists).

    drafter: None (plain decoding), a name or an object for make_drafter; batch size 1.
    draft_len: most tokens proposed past the root per forward (default: the drafter's `default_len`,
        4 for the chain drafters, the whole template for the tree drafters).
    cache: "static" | "paged" | "none" (recompute the whole sequence every forward: the quadratic
        reference the caches are tested against) | an empty cache object (QuantizedCache, ...).
    result: a DecodeResult to fill as the run goes (decode() returns it).
    """
    config = model.config
    ids = check_input_ids(ids, config, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if eos_token_id == "config":
        eos_token_id = config.eos_token_id
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
    # T + max_new_tokens is enough: a proposal never has more nodes than tokens still to produce
    size = T + max_new_tokens
    size = max(model.cache_len(size), size) if hasattr(model, "cache_len") else size  # compiled: a few sizes only
    kv = make_cache(cache, config, B, size, param.dtype, param.device)
    if kv is not None and kv.length != 0:
        raise ValueError(f"the cache given must be empty, it holds {kv.length} tokens")
    generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    result = result if result is not None else DecodeResult(rows=[])
    result.rows = [[] for _ in range(B)]
    seq, finished, last_hidden, first = ids, [False] * B, None, True
    while True:
        roots = seq[:, -1].tolist()                                  # the last token of each row
        cached = kv.length if kv is not None else 0
        pending = seq[:, cached:-1]     # not yet in the cache (the prompt in the first round; all with cache="none")
        tree = None
        if drafter is not None:                                      # propose
            n = min(k, max_new_tokens - len(result.rows[0]) - 1)     # the forward adds (accepted + 1) tokens
            if kv is not None and hasattr(kv, "max_len"):            # never overflow a cache that was given
                n = min(n, kv.max_len - cached - pending.shape[1] - 1)
            tree = drafter.propose(seq[0].tolist(), n, last_hidden, temperature=temperature, top_k=top_k,
                                   top_p=top_p, generator=generator) if n > 0 else Tree.chain(roots[0], [])
            tree = tree.prefix(n + 1)
            if tree.tokens[0] != roots[0]:
                raise ValueError(f"{type(drafter).__name__} proposed a tree rooted at {tree.tokens[0]}, not at the "
                                 f"last token {roots[0]}")
        if tree is not None and not tree.is_chain():                 # verify a tree: its own mask and positions
            if kv is None:
                raise ValueError("tree drafters need a KV cache (cache='static' or 'paged'), got cache='none'")
            if pending.shape[1]:                                     # the prompt goes in first
                prefix_logits, prefix_hidden = model(pending, cache=kv, return_hidden=True)
                result.target_forwards += 1
                if first:
                    drafter.observe(Tree.chain(pending[0, 0], pending[0, 1:]), prefix_logits[0], prefix_hidden[0])
            start = kv.length
            logits, hidden = score(model, kv, tree)                  # (N, V), (N, dim)
        else:                                                        # verify a chain (or nothing) after `pending`
            nodes = torch.tensor([[r] + (tree.tokens[1:] if tree is not None else []) for r in roots],
                                 device=ids.device)                  # (B, N)
            logits, hidden = model(torch.cat([pending, nodes], dim=1), cache=kv, return_hidden=True)
            if first and drafter is not None and pending.shape[1]:   # Token Recycling learns from the prompt
                P = pending.shape[1]
                drafter.observe(Tree.chain(pending[0, 0], pending[0, 1:]), logits[0, :P], hidden[0, :P])
            logits, hidden = logits[:, -nodes.shape[1]:], hidden[:, -nodes.shape[1]:]
            start = kv.length - nodes.shape[1] if kv is not None else None
        result.target_forwards += 1
        first = False

        if drafter is None:                                          # accept: plain decoding samples one token a row
            chunks = [[t] for t in sample_next(logits[:, -1], temperature, top_k, top_p, generator).tolist()]
            flags = [False]
        else:
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
            if kv is not None:                                       # roll back to the accepted path
                rollback(kv, start, path)
            drafter.observe(tree, logits, hidden)
            result.drafted += len(tree) - 1
            result.accepted += len(path) - 1
            result.draft_lengths.append(len(tree) - 1)
            chunks, last_hidden = [[tree.tokens[i] for i in path[1:]] + [extra]], hidden[path[-1]]
            flags = [True] * (len(path) - 1) + [False]

        left = max_new_tokens - len(result.rows[0])                  # stop
        for b in range(B):          # a finished row of a batch repeats EOS until every row is done
            chunks[b] = [eos_token_id] * len(chunks[b]) if finished[b] else _stop(chunks[b], left, eos_token_id)
        chunks = [c[:len(chunks[0])] for c in chunks]
        for b in range(B):
            result.rows[b] += chunks[b]
            finished[b] = finished[b] or (eos_token_id is not None and eos_token_id in chunks[b])
        result.from_draft += flags[:len(chunks[0])]
        yield chunks
        if len(result.rows[0]) >= max_new_tokens or all(finished):
            return
        seq = torch.cat([seq, torch.tensor(chunks, device=ids.device)], dim=1)


def decode(model, ids, max_new_tokens: int = 64, drafter=None, draft_len: int | None = None, **kwargs) -> DecodeResult:
    """Run decode_steps to the end; return the new tokens and the statistics (DecodeResult)."""
    result = DecodeResult(rows=[])
    for _ in decode_steps(model, ids, max_new_tokens, drafter, draft_len, result=result, **kwargs):
        pass
    return result


def stream(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
           seed: int | None = None, eos_token_id="config", cache="static", draft=None, draft_len: int | None = None,
           tree=None):
    """Yield next-token ids (B,) one token at a time. Stops when every sequence has produced EOS.

    cache="static" keeps keys and values in a preallocated buffer; cache="paged" in blocks of a
    PagedCache; cache="none" re-runs the whole sequence each step. draft / tree: as in generate.
    """
    drafter = _drafter_from(draft, tree)
    for chunks in decode_steps(model, ids, max_new_tokens, drafter, draft_len, temperature, top_k, top_p, seed,
                               eos_token_id, cache):
        for i in range(len(chunks[0])):
            yield torch.tensor([c[i] for c in chunks], device=ids.device)


def generate(model, ids, max_new_tokens: int = 64, draft=None, draft_len: int | None = None, tree=None,
             **kwargs) -> torch.Tensor:
    """Prompt ids (B, T) -> prompt + generated ids (B, T + n); greedy unless temperature > 0.

    Keyword arguments are those of decode_steps: temperature, top_k, top_p, seed, eos_token_id, cache.
    Sequences that stop early are padded with the EOS token.
    draft: speculative decoding (chapter 5), batch size 1: "ngram", "layerskip:N", "distilled", a
        draft checkpoint path or a drafter object, proposing up to draft_len (default 4) tokens a forward.
    tree: "recycling" | "medusa" | a tree drafter, tree-verified decoding (chapter 6), batch size 1.
    At temperature 0 every choice gives the same tokens as plain greedy decoding.
    """
    rows = decode(model, ids, max_new_tokens, _drafter_from(draft, tree), draft_len, **kwargs).rows
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
