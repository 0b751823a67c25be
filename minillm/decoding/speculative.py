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

This module holds the rule and its theory; the loop that drafts, verifies, accepts and rolls
the cache back is loop.py's (one loop for plain, speculative and tree decoding). Drafters
live in drafters.py and propose a chain: `propose(context, k, ...) -> Tree.chain(last, drafts, q)`,
q the (n, V) distributions the drafts were sampled from, or None when the drafter is
deterministic (q is then one-hot on each draft).

Limits: batch size 1 (sequences in a batch accept different numbers of tokens; keeping them in
step needs per-sequence cache lengths, which StaticCache does not have).
"""
from __future__ import annotations

import html

import torch

from .sampling import probs_from_logits
from .tree import Tree, accept_greedy


def accept_chain(draft_tokens, q, target_logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Accept a prefix of the draft and add one target token: the rule that makes speculation lossless.

    draft_tokens: n ints; q: (n, V) draft distributions or None (one-hot drafts);
    target_logits: (n + 1, V), row i scoring the token after draft i (row 0: after the context).
    Returns (number accepted m, the token the target adds after them).
    """
    n = len(draft_tokens)
    if temperature == 0:  # greedy: keep drafts while they are the target's argmax (tree.py's rule on a chain)
        path, extra = accept_greedy(Tree.chain(0, draft_tokens), target_logits)
        return len(path) - 1, extra
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


def colour_html(tok, prompt_ids, result) -> str:
    """The generated text as HTML: drafted-and-accepted tokens on green, target tokens plain.
    result: a decoding.DecodeResult (its tokens and from_draft flags)."""
    parts = [f"<span style='color:#888'>{html.escape(tok.decode(list(prompt_ids)))}</span>"]
    for token, drafted in zip(result.tokens, result.from_draft):
        text = html.escape(tok.decode([token])).replace("\n", "<br>")
        parts.append(f"<span style='background:#b7f0b1'>{text}</span>" if drafted else text)
    return "<div style='font-family:monospace;white-space:pre-wrap'>" + "".join(parts) + "</div>"
