"""`python -m minillm bench kv`: what a KV cache buys and what compressing it costs, on SmolLM2-135M.

1. Decode speed with and without a cache at 128 and 1,024 tokens of context, same run: without a
   cache each new token re-runs the whole sequence; with one it runs one token against stored k, v.
2. Memory per token, and what grouped-query attention saves. Decode speed with each cache (float32
   static, paged, int8, StreamingLLM eviction) at one context, and batched throughput at B = 1, 4, 8
   (paged): what batching buys, and why paging, which lets sequences of any length share one pool, exists.
3. Quality vs budget: int8 and eviction (StreamingLLM, H2O) against the full cache, on minillm/assets/heldout.txt:
   cache bytes holding the text, perplexity (teacher-forced, token by token after the first `budget`), top-1
   agreement with the full cache on that text, and free-running greedy agreement (tokens until the
   first divergence out of `new_tokens`).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..assets import ASSETS
from ..cache.kv_cache import QuantizedCache, StaticCache, kv_bytes_per_token
from ..cache.kv_compress import EvictingCache, greedy_prefix_agreement, teacher_forced
from ..decoding.loop import decode
from ..model.loading import load_pretrained
from ..progress import progress
from .timing import decode_tok_s, machine_line, machine_settings, results_file, write_results

HELDOUT = ASSETS / "heldout.txt"


def bench_speed(model, text_ids, contexts=(128, 1024), cached_steps=32, uncached_steps=4):
    print(f"decode speed, SmolLM2-135M float32, {machine_line()} (noisy on a shared machine)")
    print(f"{'context':>8}{'no cache tok/s':>16}{'cache tok/s':>13}{'speedup':>9}")
    rows = {}
    for ctx in contexts:
        ids = text_ids[:, :ctx]
        model(ids[:, :8])  # warm-up
        none = decode_tok_s(model, ids, uncached_steps, cache="none")
        static = decode_tok_s(model, ids, cached_steps, cache="static")
        rows[ctx] = (none, static)
        print(f"{ctx:>8}{none:>16.2f}{static:>13.2f}{static / none:>8.1f}x")
    return rows


def bench_memory(config):
    per_token = kv_bytes_per_token(config, 4)
    mha = kv_bytes_per_token(config.with_(n_kv_heads=config.n_heads), 4)
    print(f"KV cache per token: {per_token:,.0f} B float32, {per_token / 2:,.0f} B bf16, "
          f"{per_token / 4 * (config.head_dim + 4) / config.head_dim:,.0f} B int8 + float32 scales; "
          f"without GQA ({config.n_heads} KV heads instead of {config.n_kv_heads}): {mha:,.0f} B float32 "
          f"({mha / per_token:.0f}x)")
    return per_token


@torch.inference_mode()
def bench_cache_speed(model, text_ids, context: int = 128, steps: int = 24) -> dict:
    """Decode tok/s after `context` tokens with each kind of cache, same run; eviction keeps `context`
    tokens, so every decode step evicts one."""
    c = model.config
    makers = {"static float32": lambda: "static", "paged": lambda: "paged",
              "int8": lambda: QuantizedCache(c, 1, context + steps + 2),
              f"streaming {context}": lambda: EvictingCache(c, 1, context)}
    print(f"decode speed by cache after {context} tokens, {machine_line()}")
    rows = {}
    for name, make in makers.items():
        rows[name] = decode_tok_s(model, text_ids[:, :context], steps, cache=make())
        print(f"{name:<16}{rows[name]:>8.1f} tok/s {rows[name] / rows['static float32']:>6.2f}x", flush=True)
    return rows


@torch.inference_mode()
def bench_batch_throughput(model, text_ids, sizes=(1, 4, 8), context: int = 64, steps: int = 16) -> dict:
    """Generated tokens per second over a batch of B different prompts (paged cache), B = sizes."""
    print(f"batched decode throughput (paged cache, {context}-token prompts), {machine_line()}")
    rows = {}
    for B in sizes:
        ids = text_ids[0, :B * context].view(B, context)        # B different stretches of the text
        rows[B] = decode_tok_s(model, ids, steps, cache="paged")
        print(f"B = {B}: {rows[B]:7.1f} tok/s {rows[B] / rows[sizes[0]]:6.2f}x B = {sizes[0]}", flush=True)
    return rows


@torch.inference_mode()
def greedy_with_cache(model, ids, n: int, cache, chunk: int | None = None) -> list[int]:
    """n greedy tokens after the prompt ids (1, P) with `cache`, the prompt fed as teacher_forced feeds
    it (the first `chunk` tokens at once, then one by one, so that an evicting cache evicts as it goes)."""
    chunk = ids.shape[1] if chunk is None else min(chunk, ids.shape[1])
    with cache.observe(model) if getattr(cache, "policy", None) == "h2o" else nullcontext():
        if chunk == ids.shape[1]:
            return decode(model, ids, n, cache=cache, eos_token_id=None).tokens
        model(ids[:, :chunk], cache=cache)
        return decode(model, ids[:, chunk:], n, cache=cache, continue_cache=True, prefill_chunk=1,
                      eos_token_id=None).tokens


def bench_quality(model, text_ids, prompt_ids, budgets=(64, 128, 256), new_tokens=64):
    L, c = text_ids.shape[1], model.config
    # each maker takes the capacity a full cache would need; eviction ignores it (its budget is its size)
    configs = {"full": (lambda cap: StaticCache(c, 1, cap), None),
               "int8": (lambda cap: QuantizedCache(c, 1, cap), None)}
    for b in budgets:
        for policy in ("streaming", "h2o"):
            configs[f"{policy} {b}"] = (lambda cap, b=b, p=policy: EvictingCache(c, 1, b, p), b)
    full_greedy = full_argmax = None
    print(f"quality vs budget: perplexity on {L} tokens of minillm/assets/heldout.txt; greedy: {new_tokens} tokens "
          f"after a {prompt_ids.shape[1]}-token prompt")
    print(f"{'cache':<15}{'KV bytes':>12}{'perplexity':>12}{'top-1 agree':>13}{'greedy agree':>14}")
    rows = {}
    for name, (make, chunk) in configs.items():
        ppl, argmax, cache = teacher_forced(model, text_ids, lambda: make(L), chunk)
        greedy = greedy_with_cache(model, prompt_ids, new_tokens, make(prompt_ids.shape[1] + new_tokens), chunk)
        if full_greedy is None:
            full_greedy, full_argmax = greedy, argmax
        agree = (argmax == full_argmax).float().mean().item()
        same = greedy_prefix_agreement(full_greedy, greedy)
        rows[name] = dict(bytes=cache.nbytes(), ppl=ppl, top1=agree, greedy=same)
        print(f"{name:<15}{cache.nbytes():>12,}{ppl:>12.3f}{agree:>13.3f}{same:>9}/{new_tokens}", flush=True)
    return rows


def bench_kv(quality: bool = True, text_tokens: int = 384, out=None) -> dict:
    """Every stage's figures in one results file (data/kv_results.json from the repository's root)."""
    out = out if out is not None else results_file("kv_results.json")
    model, tok = load_pretrained("smollm2-135m")
    text_ids = torch.tensor([tok.encode(HELDOUT.read_text())])
    stages = {"speed": lambda: bench_speed(model, text_ids), "bytes_per_token": lambda: bench_memory(model.config),
              "by_cache": lambda: bench_cache_speed(model, text_ids),
              "batch": lambda: bench_batch_throughput(model, text_ids)}
    if quality:
        stages["quality"] = lambda: bench_quality(model, text_ids[:, :text_tokens], text_ids[:, 2000:2300])
    result = {name: stage() for name, stage in progress(stages.items(), desc="bench kv: stages", total=len(stages))}
    result["speed"] = [dict(context=ctx, no_cache_tok_s=none, cache_tok_s=static, speedup=static / none)
                       for ctx, (none, static) in result["speed"].items()]
    result["batch"] = {str(b): v for b, v in result["batch"].items()}
    result["settings"] = dict(model="SmolLM2-135M float32", text="minillm/assets/heldout.txt", **machine_settings())
    write_results(result, out)
    return result
