"""Speculative decoding: a cheap drafter guesses k tokens, the target model checks them in one forward.

Decoding one token reads every weight of the model; on a CPU or GPU that read, not the arithmetic,
sets the time. A forward over k+1 tokens reads the weights once too, so it costs about the same
as a forward over 1. Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling") spends that spare arithmetic on checking guesses:

    1. the drafter proposes d_1..d_n (n <= k), with its probabilities q_i(.) when sampling;
    2. the target runs once over [last, d_1..d_n] -> its distributions p_1..p_{n+1};
    3. accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), left to right; at the first
       rejection draw from norm(max(p_i - q_i, 0)) instead and stop;
    4. if all n are accepted, draw a bonus token from p_{n+1}.

Each round yields between 1 and n+1 tokens, distributed exactly as sampling from the target alone
would give (the tests check this with a chi-square test). At temperature 0 "accept" means
"d_i is the target's argmax", and the output is token for token the plain greedy output.

A drafter is anything with
    propose(context, k, temperature=0.0, top_k=None, top_p=None, generator=None) -> (tokens, q)
context: list of ints, the prompt and every token generated so far; tokens: list of at most k
ints; q: a (len(tokens), vocab) tensor of the distributions they were drawn from, or None when the
drafter is deterministic (q is then one-hot on each token). Drafters live in drafters.py.

Limits: batch size 1 (sequences in a batch accept different numbers of tokens; keeping them in
step needs per-sequence cache lengths, which StaticCache does not have).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .generate import check_input_ids, probs_from_logits
from .kv_cache import StaticCache


@dataclass
class SpecResult:
    tokens: list[int]                                          # the new tokens, EOS included if reached
    from_draft: list[bool] = field(default_factory=list)       # per token: a drafted token the target accepted
    target_forwards: int = 0                                   # verification forwards (the prefill is not counted)
    drafted: int = 0                                           # draft tokens proposed
    accepted: int = 0                                          # draft tokens accepted
    draft_lengths: list[int] = field(default_factory=list)     # n of each round

    @property
    def accepted_per_forward(self) -> float:
        """New tokens per target forward: 1.0 for plain decoding, up to k+1."""
        return len(self.tokens) / max(self.target_forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def verify(draft_tokens, q, target_logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Accept a prefix of the draft and add one target token: the rule that makes speculation lossless.

    draft_tokens: n ints; q: (n, V) draft distributions or None (one-hot drafts);
    target_logits: (n + 1, V), row i scoring the token after draft i (row 0: after the context).
    Returns (number accepted m, the token the target adds after them).
    """
    n = len(draft_tokens)
    if temperature == 0:  # greedy: keep drafts while they are the target's argmax
        best = target_logits.argmax(-1).tolist()                               # (n + 1,)
        m = 0
        while m < n and draft_tokens[m] == best[m]:
            m += 1
        return m, best[m]
    p = probs_from_logits(target_logits, temperature, top_k, top_p)           # (n + 1, V)
    for i, token in enumerate(draft_tokens):
        q_i = q[i] if q is not None else torch.nn.functional.one_hot(torch.tensor(token), p.shape[-1]).to(p)
        r = torch.rand((), generator=generator, device=p.device)
        if r * q_i[token] < p[i, token]:                                       # r < p/q without dividing by 0
            continue
        residual = (p[i] - q_i).clamp(min=0)                                   # norm(max(p - q, 0))
        if residual.sum() <= 0:  # p == q up to rounding: rejection had probability ~0; fall back to p
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return n, int(torch.multinomial(p[n], 1, generator=generator))            # all accepted: bonus token


@torch.inference_mode()
def speculative_generate(target, ids, max_new_tokens: int, drafter, draft_len: int = 4, temperature: float = 0.0,
                         top_k=None, top_p=None, seed: int | None = None, eos_token_id="config",
                         on_round=None, cache=None) -> SpecResult:
    """Generate up to max_new_tokens after ids (1, T) with `drafter` proposing up to draft_len tokens a round.

    The target keeps one StaticCache. Invariant: it holds every token of the sequence but the last,
    which is fed (with the drafts) in the next round's forward. After verification the rejected
    drafts' entries are rolled back with cache.truncate. on_round(result) is called after each round.
    cache: an empty cache to use (tests inspect it afterwards); default a fresh StaticCache.
    """
    ids = check_input_ids(ids, target.config, max_new_tokens)
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence (batch size 1), got batch size {ids.shape[0]}")
    if not isinstance(draft_len, int) or draft_len < 0:
        raise ValueError(f"draft_len must be an int >= 0, got {draft_len!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if eos_token_id == "config":
        eos_token_id = target.config.eos_token_id
    generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    param = next(target.parameters())
    # + draft_len: the last round may write drafts past max_new_tokens before they are rolled back
    if cache is None:
        cache = StaticCache(target.config, 1, ids.shape[1] + max_new_tokens + draft_len, dtype=param.dtype,
                            device=param.device)
    elif cache.length != 0:
        raise ValueError(f"the cache given must be empty, it holds {cache.length} tokens")
    context = ids[0].tolist()
    if len(context) > 1:
        target(ids[:, :-1], cache=cache)                                       # prefill all but the last token
    result = SpecResult(tokens=[])
    while len(result.tokens) < max_new_tokens:
        room = max_new_tokens - len(result.tokens) - 1                         # the round adds m + 1 tokens
        drafts, q = drafter.propose(context, min(draft_len, room), temperature=temperature, top_k=top_k,
                                    top_p=top_p, generator=generator) if room > 0 and draft_len > 0 else ([], None)
        drafts = list(drafts)[:min(draft_len, room)]
        start = cache.length
        x = torch.tensor([context[-1:] + drafts], device=ids.device)            # (1, n + 1)
        logits = target(x, cache=cache)[0]                                     # (n + 1, V)
        m, extra = verify(drafts, q, logits, temperature, top_k, top_p, generator)
        cache.truncate(start + 1 + m)                                          # keep [last, d_1..d_m]
        new = drafts[:m] + [extra]
        result.target_forwards += 1
        result.drafted += len(drafts)
        result.accepted += m
        result.draft_lengths.append(len(drafts))
        for i, token in enumerate(new):
            result.tokens.append(token)
            result.from_draft.append(i < m)
            context.append(token)
            if token == eos_token_id:
                break
        if on_round is not None:
            on_round(result)
        if eos_token_id is not None and result.tokens[-1] == eos_token_id:
            break
    return result


def speculative_ids(target, ids, max_new_tokens: int, drafter, draft_len: int = 4, **kwargs) -> torch.Tensor:
    """Like generate(): prompt + new ids (1, T + n)."""
    result = speculative_generate(target, ids, max_new_tokens, drafter, draft_len, **kwargs)
    return torch.cat([ids.long(), torch.tensor([result.tokens], dtype=torch.long, device=ids.device)], dim=1)


def expected_tokens_per_forward(a: float, k: int) -> float:
    """(1 - a^(k+1)) / (1 - a): tokens per target forward when each draft token is accepted
    independently with probability a (Leviathan et al. 2023, eq. 1). a=1 gives k+1."""
    if not 0 <= a <= 1:
        raise ValueError(f"acceptance rate must be in [0, 1], got {a}")
    return float(k + 1) if a == 1 else (1 - a ** (k + 1)) / (1 - a)


def expected_speedup(a: float, k: int, c: float) -> float:
    """Wall-clock speedup over plain decoding when a draft step costs c target forwards and a
    verification forward over k+1 tokens costs one: E[tokens] / (k c + 1) (Leviathan et al., thm 3.8)."""
    if c < 0:
        raise ValueError(f"cost ratio c must be >= 0, got {c}")
    return expected_tokens_per_forward(a, k) / (k * c + 1)


def colour_html(tok, prompt_ids, result: SpecResult) -> str:
    """The generated text as HTML: drafted-and-accepted tokens on green, target tokens plain."""
    import html

    parts = [f"<span style='color:#888'>{html.escape(tok.decode(list(prompt_ids)))}</span>"]
    for token, drafted in zip(result.tokens, result.from_draft):
        text = html.escape(tok.decode([token])).replace("\n", "<br>")
        parts.append(f"<span style='background:#b7f0b1'>{text}</span>" if drafted else text)
    return "<div style='font-family:monospace;white-space:pre-wrap'>" + "".join(parts) + "</div>"


def run_cli(model, tok, ids, args) -> int:
    """`python -m minillm generate --draft ...`: stream the text round by round, or print one JSON object."""
    import json
    import time

    from .drafters import make_drafter

    if args.cache != "static":
        raise ValueError(f"--draft keeps its own static cache; got --cache {args.cache}")
    drafter = make_drafter(args.draft, model)
    shown = [""]

    def show(result):
        text = tok.decode([t for t in result.tokens if t != model.config.eos_token_id])
        if not args.json and not text.endswith("\ufffd"):
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    start = time.perf_counter()
    result = speculative_generate(model, ids, args.max_new_tokens, drafter, args.draft_len,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  seed=args.seed, on_round=show)
    seconds = time.perf_counter() - start
    new_ids = [t for t in result.tokens if t != model.config.eos_token_id]
    if args.json:
        print(json.dumps({"text": tok.decode(new_ids), "prompt_tokens": ids.shape[1], "new_token_ids": new_ids,
                          "seconds": round(seconds, 4),
                          "tokens_per_second": round(len(new_ids) / seconds, 2) if seconds > 0 else None,
                          "target_forwards": result.target_forwards,
                          "accepted_per_forward": round(result.accepted_per_forward, 4),
                          "acceptance_rate": round(result.acceptance_rate, 4)}))
    else:
        print(tok.decode(new_ids)[len(shown[0]):], flush=True)
    return 0
