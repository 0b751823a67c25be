"""`python -m minillm bench tree`: plain greedy vs chain speculation vs tree verification, on SmolLM2.

Every method decodes the same prompts greedily (the output is checked equal to plain decoding),
in one process, one after the other, float32 on the CPU. Reported per method: new tokens per
target forward (the prefill counted as one forward, so plain decoding is exactly 1.0) and
wall-clock speedup over plain decoding measured in the same run.

Chain drafters come from chapter 5 (speculative.py): prompt lookup ("ngram") and, when its
checkpoint is committed, the distilled draft model. "recycling chain" is Token Recycling's
drafter restricted to a single path, a chain built with this chapter's code: it isolates what
branching adds.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .timing import median_seconds

PROMPTS = [
    "<|im_start|>user\nExplain in three short paragraphs how a bicycle gear system works.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that checks whether a string is a palindrome, "
    "and explain it.<|im_end|>\n<|im_start|>assistant\n",
    "The printing press changed Europe in several ways. First,",
]


def cost_per_size(model, prefix_len: int = 64, sizes=(1, 2, 4, 8, 16, 32, 64), repeats: int = 3) -> dict:
    """Median seconds of one forward over N tree nodes after a cached prefix: the price of a bigger tree."""
    from .kv_cache import StaticCache
    from .tree import Tree, verify

    prefix = torch.randint(0, model.config.vocab_size, (1, prefix_len), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():
        cache = StaticCache(model.config, 1, prefix_len + max(sizes))
        model(prefix, cache=cache)
        for n in sizes:
            tree = Tree(list(range(n)), [-1] + [(i - 1) // 2 for i in range(1, n)])  # a binary tree
            out[n] = median_seconds(lambda: verify(model, cache, tree), repeats,
                                    reset=lambda: cache.truncate(prefix_len))
    return out


def run_method(model, prompts, new_tokens: int, method):
    """method(prompt) -> (new token list, target forwards incl. prefill). Returns tokens, forwards, seconds."""
    tokens, forwards, seconds = [], 0, 0.0
    for ids in prompts:
        start = time.perf_counter()
        new, f = method(ids)
        seconds += time.perf_counter() - start
        tokens.append(new)
        forwards += f
    return tokens, forwards, seconds


def methods(model, new_tokens: int) -> dict:
    from .generate import generate
    from .medusa import HEADS_PATH, default_medusa_drafter
    from .tree import Template, TokenRecycling, tree_generate

    def plain(ids):
        return generate(model, ids, new_tokens, eos_token_id=None)[0, ids.shape[1]:].tolist(), new_tokens

    def tree(make_drafter):
        def run(ids):
            stats = {}
            out = tree_generate(model, ids, new_tokens, make_drafter(), eos_token_id=None, stats=stats)
            return out[0, ids.shape[1]:].tolist(), stats["forwards"] + 1
        return run

    found = {"plain": plain}
    try:
        from .drafters import make_drafter
        from .speculative import speculative_generate

        def chain(spec, draft_len=4):
            def run(ids):
                result = speculative_generate(model, ids, new_tokens, make_drafter(spec, model), draft_len,
                                              eos_token_id=None)
                return result.tokens, result.target_forwards + 1
            return run

        found["chain: prompt lookup (ch5)"] = chain("ngram")
        distilled = Path(__file__).resolve().parents[1] / "data" / "smollm2_draft.safetensors"
        if distilled.exists():
            found["chain: distilled draft (ch5)"] = chain(str(distilled))
    except ImportError as e:
        print(f"chapter 5 (speculative.py) not importable ({e}): comparing against our own chain only")
    vocab = model.config.vocab_size
    found["chain: recycling, 1 path"] = tree(lambda: TokenRecycling(vocab, template=Template.budget(3, 0)))
    found["tree: Token Recycling"] = tree(lambda: TokenRecycling(vocab))
    if (Path(__file__).resolve().parents[1] / "data" / HEADS_PATH).exists():
        found["tree: Medusa heads"] = tree(lambda: default_medusa_drafter(model))
    return found


def bench_tree(new_tokens: int = 64, threads: int = 1) -> dict:
    from .loading import load_pretrained

    torch.set_num_threads(threads)  # 1 by default: on a shared CPU a second OpenMP thread mostly waits
    model, tok = load_pretrained("smollm2-135m")
    prompts = [torch.tensor([tok.encode(p, allowed_special="all")]) for p in PROMPTS]
    with torch.inference_mode():
        model(prompts[0])  # warm-up
    results, reference = {}, None
    for name, method in methods(model, new_tokens).items():
        tokens, forwards, seconds = run_method(model, prompts, new_tokens, method)
        if reference is None:
            reference = tokens
        results[name] = dict(tokens_per_forward=sum(map(len, tokens)) / forwards, seconds=seconds,
                             same_as_plain=tokens == reference)
    base = results["plain"]["seconds"]
    print(f"SmolLM2-135M, float32, CPU, {torch.get_num_threads()} threads, greedy, {len(prompts)} prompts x "
          f"{new_tokens} new tokens, one run (a shared CPU: timings are noisy)")
    print(f"{'method':<30}{'tokens/forward':>16}{'seconds':>10}{'speedup':>10}{'== plain':>10}")
    for name, r in results.items():
        r["speedup"] = base / r["seconds"]
        print(f"{name:<30}{r['tokens_per_forward']:>16.2f}{r['seconds']:>10.2f}{r['speedup']:>9.2f}x"
              f"{str(r['same_as_plain']):>10}")
    return results
