"""`python -m minillm bench speculative`: plain cached greedy decoding vs each drafter, SmolLM2, median of rounds.

Two prompt sets in SmolLM2's chat template: input-grounded (rewrite / fix / edit a given text or
code, where the answer copies much of the prompt and prompt lookup shines) and open-ended (the
answer is new text). For each drafter: tokens per target forward, draft acceptance rate, wall-clock
speedup over plain decoding timed in the same process, and the speedup the formula predicts from the
measured acceptance a and the measured cost ratio c of one draft forward to one target forward.
Every speculative output is compared token for token with the plain greedy output of the same
model, dtype and kernels: identical in float32; in bfloat16 or int4 a 1-row and a k-row forward
can round a near-tie differently, and the table says on how many prompts that happened, unless every
step runs one compiled width (`--compile --fixed-width 8`): then plain decoding pads its token to the
verify's width, the logits are bit-equal and so are the tokens. With a fixed width the table adds
"plain, 1-row steps" (the same weights on the usual compiled widths): the price of the fixed width.
Chapter 6's trees, for comparison: Token Recycling started empty, started warm (its matrix filled once
from WARM_TEXT before any timing), that warm tree merged with prompt lookup's chain (tree.merge), and
its dynamic trees (grown best first from the guesses' probabilities), empty and warm, and those with
two-token keys ("pairs": TokenRecycling(context=2), guesses kept per (previous token, token) too).
`stack` chooses the model (dtype, quantization, compiled step; see backends/stack.py), the same for both sides.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..assets import ASSETS
from ..backends.prepack import linear_kernels
from ..backends.stack import describe, load_stack
from ..cache.kv_cache import StaticCache
from ..decoding.drafters import ModelDrafter, NgramDrafter, early_exit_model, layer_skip_drafter, load_draft_model
from ..decoding.loop import DISTILLED_DRAFT, decode
from ..decoding.speculative import expected_speedup
from ..decoding.tree import MergedDrafter, TokenRecycling
from ..native import logits as cpu_logits
from ..progress import progress
from .timing import machine_line, machine_settings, median_seconds, memory_bandwidth_gb_s, sandwiched, write_results

DRAFT_CKPT = DISTILLED_DRAFT
# Token Recycling's warm start (chapter 6): its matrix filled once from this text, before any timing. The
# matrix a server carries from earlier requests: SmolLM2's greedy answers to 24 chat requests on other topics
# than every bench prompt (data/make_recycling_warm.py; tests/test_tree.py checks they share none)
WARM_TEXT, WARM_TOKENS = ASSETS / "recycling_warm.txt", 4096

GROUNDED = [
    "Rewrite this paragraph with correct spelling and punctuation:\n\nthe printing press was invented by "
    "johannes gutenberg around 1440 it used movable metal type and oil based ink, which made books much "
    "cheaper to produce and helped spread literacy across europe",
    "Rename the function `add` to `sum_two` in this code and return the whole code:\n\n```python\n"
    "def add(a, b):\n    return a + b\n\n\ndef add_all(values):\n    total = 0\n    for v in values:\n"
    "        total = add(total, v)\n    return total\n```",
    "Repeat the following list, adding a comma after each item:\n\napples\nbananas\ncherries\ndates\n"
    "elderberries\nfigs\ngrapes",
]
OPEN_ENDED = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue.",
    "Give three tips for staying focused while studying.",
]


def warm_recycler(model, tok, dynamic: bool = False, context: int = 1) -> tuple[TokenRecycling, float]:
    """Token Recycling's matrix filled from the first WARM_TOKENS tokens of WARM_TEXT (SmolLM2's answers to other
    requests than the benches'), and the seconds that took; dynamic: a drafter that grows dynamic trees;
    context=2: one that keys its guesses by two tokens as well."""
    start = time.perf_counter()
    warm = TokenRecycling(model.config.vocab_size, dynamic=dynamic, context=context).warm_up(
        model, tok.encode(WARM_TEXT.read_text())[:WARM_TOKENS])
    return warm, time.perf_counter() - start


def chat_ids(tok, message: str) -> torch.Tensor:
    return torch.tensor([tok.encode_chat([{"role": "user", "content": message}], add_generation_prompt=True)])


def plain_greedy(model, ids, new_tokens: int) -> list[int]:
    """Cached greedy decoding, one token per forward: the baseline."""
    return decode(model, ids, new_tokens, eos_token_id=None).tokens


def forward_cost(model, ids, repeats: int = 5) -> float:
    """Median seconds of one cached 1-token forward after ids."""
    cache = StaticCache(model.config, 1, ids.shape[1] + 1, dtype=next(model.parameters()).dtype)
    with torch.inference_mode():
        model(ids[:, :-1], cache=cache)
        return median_seconds(lambda: model(ids[:, -1:], cache=cache), repeats,
                              reset=lambda: cache.truncate(ids.shape[1] - 1))


def one_row_plain(model):
    """For a model compiled at one fixed width: the same weights compiled with the usual widths, whose plain
    steps run one row (the fastest plain decoding, whose tokens may differ at near-ties); else None."""
    if getattr(model, "widths", (1,))[0] == 1:
        return None
    from ..backends.compiled import compile_decode

    return compile_decode(model.model)


def verify_agreement(model, ids, tokens: list[int], width: int = 5) -> dict:
    """How often a verify forward disagrees with plain decoding, free of drift: the logits for the
    same tokens computed one per forward (plain decoding) and `width` per forward (a verify step),
    from identical caches. Returns positions compared, argmax disagreements, largest |logit| gap."""
    dtype = next(model.parameters()).dtype
    seq = torch.cat([ids, torch.tensor([tokens])], dim=1)
    P, n = ids.shape[1], len(tokens)
    size = max(model.cache_len(seq.shape[1]), seq.shape[1]) if hasattr(model, "cache_len") else seq.shape[1]
    caches = [StaticCache(model.config, 1, size, dtype=dtype) for _ in range(2)]  # compiled: room for its widths
    with torch.inference_mode():
        for cache in caches:
            model(seq[:, :P - 1], cache=cache)
        one = torch.cat([model(seq[:, t:t + 1], cache=caches[0])[0] for t in range(P - 1, P - 1 + n)])
        wide = torch.cat([model(seq[:, t:min(t + width, P - 1 + n)], cache=caches[1])[0]
                          for t in range(P - 1, P - 1 + n, width)])
    return dict(positions=n, argmax_differs=int((one.argmax(-1) != wide.argmax(-1)).sum()),
                max_logit_gap=float((one.float() - wide.float()).abs().max()))


def bench_speculative(new_tokens: int = 64, draft_len: int = 4, threads: int = 1, layers=(8, 20),
                      stack: dict | None = None, out=None, repeats: int = 3) -> dict:
    """Every chain drafter, and chapter 6's Token Recycling tree (at most draft_len + 1 nodes), on two prompt
    sets -> {(set, method): {tpf, a, speedup, formula, c, same}};
    out: also write them, with the stack and the machine's settings, as JSON there; repeats: rounds of every
    set and method, interleaved, plain decoding timed before, between and after the methods, each speedup the
    median of a method's ratios to the plain runs beside it (timing.sandwiched)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    torch.set_num_threads(threads)
    stack = stack or {}
    model, tok = load_stack(**stack)
    sets = {"grounded": [chat_ids(tok, m) for m in GROUNDED], "open-ended": [chat_ids(tok, m) for m in OPEN_ENDED]}
    methods = {"ngram": (lambda: NgramDrafter(), 0.0)}
    for n in layers:
        methods[f"layerskip:{n}"] = (lambda n=n: layer_skip_drafter(model, n), None)
    if DRAFT_CKPT.exists():
        draft = load_draft_model(DRAFT_CKPT)
        methods["distilled"] = (lambda: ModelDrafter(draft), None)
        methods["distilled adaptive"] = (lambda: ModelDrafter(draft, stop_below=0.5), None)
    else:
        print(f"({DRAFT_CKPT.name} not found: run data/distill_draft.py to add the distilled drafter)")
    methods["recycling tree"] = (lambda: TokenRecycling(model.config.vocab_size), 0.0)  # chapter 6, for comparison
    warm, warm_seconds = warm_recycler(model, tok)    # chapter 6's warm start, and its tree merged with prompt lookup
    methods["recycling tree, warm"] = (warm.copy, 0.0)
    methods["lookup+recycling tree, warm"] = (lambda: MergedDrafter(NgramDrafter(), warm.copy()), 0.0)
    warm_dynamic, _ = warm_recycler(model, tok, dynamic=True)     # chapter 6: trees grown best first
    methods["recycling tree, dynamic"] = (lambda: TokenRecycling(model.config.vocab_size, dynamic=True), 0.0)
    methods["recycling tree, dynamic, warm"] = (warm_dynamic.copy, 0.0)
    warm_pairs, _ = warm_recycler(model, tok, dynamic=True, context=2)   # and keyed by two tokens where seen
    methods["recycling tree, pairs"] = (lambda: TokenRecycling(model.config.vocab_size, dynamic=True, context=2),
                                        0.0)
    methods["recycling tree, pairs, warm"] = (warm_pairs.copy, 0.0)
    probe = sets["open-ended"][0]
    target_s = forward_cost(model, probe)
    cost = {f"layerskip:{n}": forward_cost(early_exit_model(model, n), probe) / target_s for n in layers}
    if DRAFT_CKPT.exists():
        cost["distilled"] = cost["distilled adaptive"] = forward_cost(draft, probe) / target_s
    for make, _ in [(lambda: None, None)] + list(methods.values()):  # warm-up: every width a method uses
        decode(model, probe, new_tokens, make(), draft_len, eos_token_id=None)
    narrow = one_row_plain(model)
    if narrow is not None:
        decode(narrow, probe, new_tokens, eos_token_id=None)
    # every (set, method) timed once per round, plain decoding before, between and after the methods of a set
    # (timing.sandwiched), rounds interleaved: each speedup is the median of its ratios to the plain runs beside
    # it, so that a slow minute of this shared VM falls on both sides of a ratio, not on a method alone
    runs, ratios, plains = {}, {}, {}

    def plain_seconds(set_name, prompts):
        start = time.perf_counter()
        plains[set_name] = [plain_greedy(model, ids, new_tokens) for ids in prompts]
        return time.perf_counter() - start

    def narrow_seconds(set_name, prompts):   # what a fixed width costs plain decoding, and whether its tokens move
        start = time.perf_counter()
        tokens = [plain_greedy(narrow, ids, new_tokens) for ids in prompts]
        seconds = time.perf_counter() - start
        runs[(set_name, "plain, 1-row steps")] = dict(tpf=1.0, a=None, formula=None,
                                                     same=sum(t == r for t, r in zip(tokens, plains[set_name])))
        return seconds

    def method_seconds(set_name, prompts, name, make, c):
        c = cost.get(name, c)
        drafted = accepted = forwards = produced = same = 0
        start = time.perf_counter()
        for ids, reference in zip(prompts, plains[set_name]):
            r = decode(model, ids, new_tokens, make(), draft_len, eos_token_id=None)
            same += r.tokens == reference
            drafted, accepted = drafted + r.drafted, accepted + r.accepted
            forwards, produced = forwards + r.target_forwards, produced + len(r.tokens)
        seconds = time.perf_counter() - start
        a = accepted / max(drafted, 1)
        runs[(set_name, name)] = dict(tpf=produced / forwards, a=a, c=c, same=same,
                                      formula=None if "tree" in name else  # the formula is for chains
                                      expected_speedup(min(a, 0.999), draft_len, c))
        return seconds

    for _ in progress(range(repeats), desc="bench speculative: rounds of every set and method", total=repeats):
        for set_name, prompts in sets.items():
            runs[(set_name, "plain")] = dict(tpf=1.0, a=None, formula=None, same=len(prompts))
            measures = {"plain, 1-row steps": lambda s=set_name, p=prompts: narrow_seconds(s, p)} if narrow else {}
            measures.update({name: lambda s=set_name, p=prompts, n=name, m=make, c=c: method_seconds(s, p, n, m, c)
                             for name, (make, c) in methods.items()})
            _, rest = sandwiched(lambda s=set_name, p=prompts: plain_seconds(s, p), measures)
            ratios.setdefault((set_name, "plain"), []).append(1.0)
            for name, (_, ratio) in rest.items():
                ratios.setdefault((set_name, name), []).append(ratio)
    # runs is in table order already: per set plain, the 1-row plain, then the drafters
    rows = {key: dict(run, speedup=statistics.median(ratios[key])) for key, run in runs.items()}
    agreement = [verify_agreement(model, ids, tokens) for name in sets for ids, tokens in zip(sets[name], plains[name])]
    bandwidth = memory_bandwidth_gb_s()
    print(machine_line(), f"| memory bandwidth {bandwidth:.1f} GB/s")
    print(f"SmolLM2-135M, {describe(**stack)} ({linear_kernels(model)}; {cpu_logits.describe()}),\n  greedy, "
          f"{new_tokens} new tokens x 3 chat prompts per set, draft_len={draft_len}, median of {repeats} rounds, each "
          f"speedup against the plain runs just before and after it;\n  one target forward = {1000 * target_s:.0f} ms")
    print(f"warm trees: Token Recycling's matrix filled once from {WARM_TOKENS} tokens of {WARM_TEXT.name} in "
          f"{warm_seconds:.1f} s (not in the rounds)")
    print(f"{'set':<12}{'method':<29}{'tokens/forward':>15}{'accept a':>10}{'cost c':>8}"
          f"{'speedup':>9}{'formula':>9}{'== plain':>10}")
    for (set_name, name), r in rows.items():
        a = "" if r["a"] is None else f"{r['a']:.2f}"
        c = "" if r.get("c") is None else f"{r['c']:.2f}"
        formula = "" if r["formula"] is None else f"{r['formula']:.2f}x"
        print(f"{set_name:<12}{name:<29}{r['tpf']:>15.2f}{a:>10}{c:>8}{r['speedup']:>8.2f}x{formula:>9}{r['same']:>8}/{len(GROUNDED)}")
    print(f"plain vs verify forwards on the same tokens (1 vs 5 per forward, no drift): argmax differs at "
          f"{sum(a['argmax_differs'] for a in agreement)} of {sum(a['positions'] for a in agreement)} positions, "
          f"largest logit gap {max(a['max_logit_gap'] for a in agreement):.3g}")
    print("formula: (1 - a^(k+1)) / ((1 - a)(k c + 1)), assuming i.i.d. acceptance and a (k+1)-token verify "
          "forward costing one 1-token forward; n-gram drafts are often shorter than k (no match), so its a "
          "is per drafted token. Timings on a shared CPU are noisy.")
    write_results(dict(settings=dict(stack=describe(**stack), linears=linear_kernels(model),
                                     logits=cpu_logits.describe(),
                                     new_tokens=new_tokens, draft_len=draft_len, repeats=repeats,
                                     prompts_per_set=len(GROUNDED), target_forward_ms=round(1000 * target_s, 1),
                                     warm_up=dict(text=f"minillm/assets/{WARM_TEXT.name}", tokens=WARM_TOKENS,
                                                  seconds=round(warm_seconds, 2)),
                                     memory_bandwidth_gb_s=round(bandwidth, 2), **machine_settings()),
                       rows=[dict(set=s, method=m, **r) for (s, m), r in rows.items()]), out)
    return rows
