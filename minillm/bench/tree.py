"""`python -m minillm bench tree`: plain greedy vs chain speculation vs tree verification, on SmolLM2.

Every method decodes the same prompts greedily,
in one process, one after the other, on the CPU; `stack` chooses the model (dtype, quantization,
compiled step; see backends/stack.py), the same for every method. "== plain" counts the prompts whose tokens
equal plain greedy decoding of that same model (always all in float32; bfloat16 and int4 can round a
near-tie differently in a 1-row and a many-row forward, unless every step runs one compiled width,
`--compile --fixed-width 8`: then chains are bit-exact and trees nearly so, since a tree node's
ancestors sit in other cache slots than in plain decoding, and attention adds them in another order).
With a fixed width, "plain, 1-row steps" is plain decoding on the usual compiled widths: the fastest
plain decoding, what the fixed width costs it. Reported per method: new tokens per
target forward (the prefill counted as one forward, so plain decoding is 1.0, a little less on a
compiled model, which feeds the prompt in a forward of its own) and
wall-clock speedup over plain decoding measured in the same run.

Chain drafters come from chapter 5 (decoding/speculative.py): prompt lookup ("ngram") and, when its
checkpoint is committed, the distilled draft model. "recycling chain" is Token Recycling's
drafter restricted to a single path, a chain built with this chapter's code: it isolates what
branching adds. "Token Recycling, warm" starts every prompt from a copy of one matrix filled once, before
the timed rounds, from the first WARM_TOKENS tokens of minillm/assets/recycling_warm.txt (SmolLM2's greedy answers to
24 chat requests on other topics than these prompts; `TokenRecycling.warm_up`): the matrix a long-running
process would carry from earlier requests, instead of an empty one. Its one-off cost is printed, not counted in the rounds.
"lookup + recycling, warm" merges prompt lookup's chain and that warm tree into one tree (tree.merge).
"Token Recycling, dynamic" grows each tree best first from the guesses' stored probabilities instead of
the static template's shape (TokenRecycling(dynamic=True)), empty and warm; "pairs" does that with its
guesses kept per (previous token, token) too, read where the pair was seen (TokenRecycling(context=2)).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..backends.prepack import linear_kernels
from ..backends.stack import describe, load_stack
from ..cache.kv_cache import StaticCache
from ..decoding.drafters import ModelDrafter, NgramDrafter, load_draft_model
from ..decoding.loop import DISTILLED_DRAFT, decode
from ..decoding.medusa import HEADS, default_medusa_drafter
from ..decoding.tree import MergedDrafter, Template, TokenRecycling, Tree, score
from ..native import logits as cpu_logits
from ..progress import progress
from .speculative import WARM_TEXT, WARM_TOKENS, one_row_plain, warm_recycler
from .timing import machine_line, machine_settings, median_seconds, memory_bandwidth_gb_s, sandwiched, write_results

ChainDrafters = (NgramDrafter, ModelDrafter)  # draft 4 tokens a forward; tree drafters use their whole template

PROMPTS = [
    "<|im_start|>user\nExplain in three short paragraphs how a bicycle gear system works.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that checks whether a string is a palindrome, "
    "and explain it.<|im_end|>\n<|im_start|>assistant\n",
    "The printing press changed Europe in several ways. First,",
]


def cost_per_size(model, prefix_len: int = 64, sizes=(1, 2, 4, 8, 16, 32, 64), repeats: int = 3) -> dict:
    """Median seconds of one forward over N tree nodes after a cached prefix: the price of a bigger tree."""
    prefix = torch.randint(0, model.config.vocab_size, (1, prefix_len), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():
        cache = StaticCache(model.config, 1, prefix_len + max(sizes), dtype=next(model.parameters()).dtype)
        model(prefix, cache=cache)
        for n in sizes:
            tree = Tree(list(range(n)), [-1] + [(i - 1) // 2 for i in range(1, n)])  # a binary tree
            out[n] = median_seconds(lambda: score(model, cache, tree), repeats,
                                    reset=lambda: cache.truncate(prefix_len))
    return out


def methods(model, warm: TokenRecycling | None = None, warm_dynamic: TokenRecycling | None = None,
            warm_pairs: TokenRecycling | None = None) -> dict:
    """name -> a fresh drafter (None: plain decoding). Every one goes through decoding.decode.
    warm, warm_dynamic, warm_pairs: filled Token Recycling drafters (static trees, dynamic ones, dynamic ones
    with two-token keys); each run of a warm method gets its own copy."""
    vocab = model.config.vocab_size
    found = {"plain": lambda: None, "chain: prompt lookup (ch5)": lambda: NgramDrafter()}
    if DISTILLED_DRAFT.exists():
        draft = load_draft_model(DISTILLED_DRAFT)
        found["chain: distilled draft (ch5)"] = lambda: ModelDrafter(draft)
    found["chain: recycling, 1 path"] = lambda: TokenRecycling(vocab, template=Template.budget(3, 0))
    found["tree: Token Recycling"] = lambda: TokenRecycling(vocab)
    if warm is not None:
        found["tree: Token Recycling, warm"] = warm.copy
        found["tree: lookup + recycling, warm"] = lambda: MergedDrafter(NgramDrafter(), warm.copy())
    found["tree: Token Recycling, dynamic"] = lambda: TokenRecycling(vocab, dynamic=True)
    if warm_dynamic is not None:
        found["tree: Token Recycling, dynamic, warm"] = warm_dynamic.copy
    found["tree: Token Recycling, pairs"] = lambda: TokenRecycling(vocab, dynamic=True, context=2)
    if warm_pairs is not None:
        found["tree: Token Recycling, pairs, warm"] = warm_pairs.copy
    if HEADS.exists():
        found["tree: Medusa heads"] = lambda: default_medusa_drafter(model)
    return found


def bench_tree(new_tokens: int = 64, threads: int = 1, stack: dict | None = None, out=None, repeats: int = 3) -> dict:
    """Every method on the same prompts -> {name: {tokens_per_forward, seconds, same_as_plain, speedup}};
    seconds: the median of `repeats` rounds, each timing every method once in turn with plain decoding before,
    between and after them; speedup: the median of each round's ratio to the plain runs beside it
    (timing.sandwiched: a slow spell of a shared machine falls on both sides of a ratio); out: also write them,
    with the stack and the machine's settings, as JSON there."""
    torch.set_num_threads(threads)  # 1 by default: on a shared CPU a second OpenMP thread mostly waits
    stack = stack or {}
    model, tok = load_stack(**stack)
    prompts = [torch.tensor([tok.encode(p, allowed_special="all")]) for p in PROMPTS]
    warm, warm_seconds = warm_recycler(model, tok)
    warm_dynamic, _ = warm_recycler(model, tok, dynamic=True)
    warm_pairs, _ = warm_recycler(model, tok, dynamic=True, context=2)
    found = {name: (model, make) for name, make in methods(model, warm, warm_dynamic, warm_pairs).items()}
    narrow = one_row_plain(model)
    if narrow is not None:  # a fixed width: what it costs plain decoding, and whether plain's tokens move
        found["plain, 1-row steps"] = (narrow, lambda: None)
    run = lambda net, drafter, ids: decode(net, ids, new_tokens, drafter,  # noqa: E731
                                           4 if isinstance(drafter, ChainDrafters) else None, eos_token_id=None)
    for net, make in found.values():  # warm-up: every forward width a method uses (compiled: compiles it)
        run(net, make(), prompts[0])
    results, times, ratios = {}, {name: [] for name in found}, {name: [] for name in found}

    def timed(name):
        net, make = found[name]
        start = time.perf_counter()
        runs = [run(net, make(), ids) for ids in prompts]
        results[name] = dict(tokens_per_forward=sum(len(r.tokens) for r in runs) / sum(r.target_forwards for r in runs),
                             tokens=[r.tokens for r in runs])
        return time.perf_counter() - start

    for _ in progress(range(repeats), desc="bench tree: rounds of every method", total=repeats):
        # plain decoding before, between and after the others (timing.sandwiched): each speedup against the plain
        # runs beside it, so that a slow spell of this shared machine cannot fall on a method and miss the baseline
        others = {name: lambda n=name: timed(n) for name in found if name != "plain"}
        base, rest = sandwiched(lambda: timed("plain"), others)
        times["plain"] += base
        ratios["plain"].append(1.0)
        for name, (seconds, ratio) in rest.items():
            times[name].append(seconds)
            ratios[name].append(ratio)
    reference = results["plain"]["tokens"]
    for name, r in results.items():
        r["seconds"] = statistics.median(times[name])
        r["speedup"] = statistics.median(ratios[name])
        r["same_as_plain"] = sum(t == p for t, p in zip(r.pop("tokens"), reference))
    bandwidth = memory_bandwidth_gb_s()
    print(machine_line(), f"| memory bandwidth {bandwidth:.1f} GB/s")
    print(f"SmolLM2-135M, {describe(**stack)} ({linear_kernels(model)}; {cpu_logits.describe()}),\n  greedy, "
          f"{len(prompts)} prompts x {new_tokens} new tokens, median of {repeats} rounds, each speedup against the "
          f"plain runs just before and after it (a shared CPU: timings are noisy)")
    print(f"warm Token Recycling: its matrix filled once from {WARM_TOKENS} tokens of {WARM_TEXT.name} "
          f"in {warm_seconds:.1f} s (not in the rounds)")
    print(f"{'method':<38}{'tokens/forward':>16}{'seconds':>10}{'speedup':>10}{'== plain':>10}")
    for name, r in results.items():
        print(f"{name:<38}{r['tokens_per_forward']:>16.2f}{r['seconds']:>10.2f}{r['speedup']:>9.2f}x"
              f"{r['same_as_plain']:>8}/{len(prompts)}")
    write_results(dict(settings=dict(stack=describe(**stack), linears=linear_kernels(model),
                                     logits=cpu_logits.describe(), new_tokens=new_tokens, prompts=len(prompts),
                                     warm_up=dict(text=f"minillm/assets/{WARM_TEXT.name}", tokens=WARM_TOKENS,
                                                  seconds=round(warm_seconds, 2)),
                                     repeats=repeats, memory_bandwidth_gb_s=round(bandwidth, 2),
                                     **machine_settings()), rows=results), out)
    return results
