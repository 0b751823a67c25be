"""`python -m minillm bench stack`: every technique stacked, one per step, raced against llama.cpp in one run.

Steps, each adding one technique to the one before (chapter 8):
    float32, no KV cache -> + static KV cache -> + bfloat16 -> + int8 weights -> int4 weights with
    an int8 head -> + compiled decode step -> + prompt lookup -> + Token Recycling
The drafter steps run the compiled model at one width, 8 (backends/compiled.py): plain and verify steps take the
same graph, so a drafter's tokens equal plain decoding's of that model bit for bit, and each verify
step checks up to 7 drafted tokens; the fixed width's price is in their tokens/s.
`bench stack --native` runs the race with the native step (backends/native_step.py, one C++ call a step) in the compiled
step's place (stack.NATIVE_STEPS, data/runs/xeon-amx/stack_results_native.json): the steps up to the compiled one, then the int4
weights on the native step, alone and under each drafter, whose tokens then equal plain decoding's with 1-row
plain steps. The int4 step is g32 asymmetric: exactly the GGUF's Q4_1 weights, the ones llama.cpp runs (its
perplexity is float32's), so the race compares two engines on the same weights.
Two prompt sets in SmolLM2's chat template (bench speculative's): input-grounded (rewrite, fix,
edit a given text) and open-ended (questions, stories); greedy, `new_tokens` each.

For each step and set: decode tok/s (tokens after the first forward / time after it: the prefill is
timed apart), prefill tok/s (prompt tokens / the first forward), weight bytes read per generated
token (model bytes / tokens per forward), memory held (weights + KV cache), perplexity on
minillm/assets/heldout.txt (first `eval_tokens`), and greedy agreement with the float32 model (leading
tokens shared, out of new_tokens). A drafter step is lossless when its tokens equal plain greedy
decoding of the same model (weights and compiled graph, run untimed); the table says on how many
prompts they did. Every timing is the median of `repeats` runs of the whole set.

The peer: llama.cpp through the `xllamacpp` wheel (its in-process server), on the same GGUF file, the
same prompt token ids, the same thread count, greedy, `new_tokens`; its own timings (prompt and
predicted per second). Without the wheel the row says so and holds no number.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from ..assets import asset
from ..backends.stack import STEPS, describe, load_stack
from ..cache.kv_compress import greedy_prefix_agreement as leading_agreement
from ..decoding.loop import decode_steps, make_drafter
from ..model.loading import gguf_path
from ..model.perplexity import nll_sum
from ..progress import progress
from ..quant import model_bytes
from .speculative import GROUNDED, OPEN_ENDED, chat_ids
from .timing import PeakRSS, machine_line, machine_settings, memory_bandwidth_gb_s, results_file, write_results

# What each step has switched on (the int4 step replaces int8; Token Recycling replaces prompt lookup)
TECHNIQUES = ("kv_cache", "bfloat16", "int8", "int4", "compiled", "prompt_lookup", "token_recycling")
_BASE = ("kv_cache", "bfloat16", "int4", "compiled")
STEP_TECHNIQUES = [(), ("kv_cache",), ("kv_cache", "bfloat16"), ("kv_cache", "bfloat16", "int8"), _BASE[:3], _BASE,
                   _BASE + ("prompt_lookup",), _BASE + ("token_recycling",)]


def predict(techniques, results: dict, prompts: str = "grounded") -> dict:
    """For a set of techniques: the committed measurement if that stack was one of the steps, and the
    bytes-read limit (bandwidth / weight bytes read per generated token) predicted from the committed
    model sizes and tokens per forward. A name not in TECHNIQUES, or a combination that does not
    make sense, is a ValueError that says which."""
    chosen = set(techniques)
    if unknown := chosen - set(TECHNIQUES):
        raise ValueError(f"unknown technique(s) {sorted(unknown)}; choose from {list(TECHNIQUES)}")
    if {"int8", "int4"} <= chosen:
        raise ValueError("int8 and int4 are two weight formats: choose one")
    if {"prompt_lookup", "token_recycling"} <= chosen:
        raise ValueError("prompt_lookup and token_recycling are two drafters: choose one")
    if chosen & {"prompt_lookup", "token_recycling", "compiled"} and "kv_cache" not in chosen:
        raise ValueError("drafters and the compiled step need the KV cache: add kv_cache")
    rows = {tuple(t): r for t, r in zip(STEP_TECHNIQUES, results["rows"])}
    # weight bytes read per forward: those of the step with that weight format (the float parts' dtype
    # moves a quantized model's bytes little; not modelled)
    fmt = (*_BASE[:3],) if "int4" in chosen else ("kv_cache", "bfloat16", "int8") if "int8" in chosen else \
        ("kv_cache", "bfloat16") if "bfloat16" in chosen else ("kv_cache",)
    weight_bytes = rows[fmt]["model_bytes"]
    drafter = "prompt_lookup" if "prompt_lookup" in chosen else "token_recycling" if "token_recycling" in chosen else None
    tpf = rows[_BASE + (drafter,)][prompts]["tokens_per_forward"] if drafter else 1.0
    measured = next((r for t, r in rows.items() if set(t) == chosen), None)
    # without a KV cache a step recomputes the whole sequence: bound by arithmetic, not by the weights' bytes
    limit = results["memory_bandwidth_gb_s"] * 1e9 * tpf / weight_bytes if "kv_cache" in chosen else None
    return dict(measured_tok_s=measured[prompts]["decode_tok_s"] if measured else None, limit_tok_s=limit,
                tokens_per_forward=tpf, weight_bytes=weight_bytes)


def where_time_goes(model, ids, steps: int = 8) -> dict:
    """Milliseconds per decode step by kind, from torch.profiler over `steps` cached greedy steps:
    matmuls (dense and quantized), attention, other ops, and the rest of the wall clock (Python,
    dispatch, the loop itself)."""
    from torch.profiler import ProfilerActivity, profile

    kinds = {"matmul": ("mm", "addmm", "linear", "matmul", "bmm", "_weight_int4pack_mm", "_weight_int8pack_mm"),
             "attention": ("scaled_dot_product", "_flash_attention", "softmax", "minillm::cpu_attention")}
    steps_iter = decode_steps(model, ids, steps + 1, eos_token_id=None)
    next(steps_iter)                                                 # the prefill, not profiled
    saved = os.dup(2)                       # the profiler's C++ side logs its start and stop on stderr
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in steps_iter:
                pass
            wall = time.perf_counter() - start
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    out = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
    for event in prof.key_averages():
        name = event.key.removeprefix("aten::")
        kind = next((k for k, names in kinds.items() if any(name.startswith(n) for n in names)), "other ops")
        out[kind] += event.self_cpu_time_total / 1e3
    out = {k: v / steps for k, v in out.items()}
    out["Python, dispatch, loop"] = max(wall * 1e3 / steps - sum(out.values()), 0.0)
    out["wall"] = wall * 1e3 / steps
    return out


def timed_decode(model, ids, new_tokens: int, drafter, cache: str) -> dict:
    """One greedy run: prefill seconds, decode seconds (after the first forward), tokens, forwards. On a model
    compiled at one width a drafter proposes as many tokens as that width holds (width - 1 past the root)."""
    widths = getattr(model, "widths", ())
    draft_len = widths[0] - 1 if drafter is not None and len(widths) == 1 else None
    steps = decode_steps(model, ids, new_tokens, drafter, draft_len, eos_token_id=None, cache=cache)
    start = time.perf_counter()
    first = next(steps)
    prefill = time.perf_counter() - start
    tokens, forwards = list(first[0]), 1
    for chunk in steps:
        tokens += chunk[0]
        forwards += 1
    return dict(prefill_s=prefill, decode_s=time.perf_counter() - start - prefill, tokens=tokens,
                forwards=forwards, prompt_tokens=ids.shape[1])


def measure_set(model, prompts, new_tokens: int, drafter_name, cache: str, repeats: int) -> dict:
    """Median over `repeats` runs of the whole prompt set (a fresh drafter per prompt)."""
    runs = []
    for _ in range(repeats):
        runs.append([timed_decode(model, ids, new_tokens, make_drafter(drafter_name, model) if drafter_name else None,
                                  cache) for ids in prompts])
    decode_s = statistics.median(sum(r["decode_s"] for r in run) for run in runs)
    prefill_s = statistics.median(sum(r["prefill_s"] for r in run) for run in runs)
    last = runs[-1]
    after_first = sum(len(r["tokens"]) - 1 for r in last)  # the first forward's token is the prefill's
    return dict(decode_tok_s=after_first / decode_s, prefill_tok_s=sum(r["prompt_tokens"] for r in last) / prefill_s,
                tokens_per_forward=sum(len(r["tokens"]) for r in last) / sum(r["forwards"] for r in last),
                tokens=[r["tokens"] for r in last])


def llama_cpp_params(xlc, threads: int, context: int):
    """llama.cpp's settings for the wheel's GGUF: the context and the thread count, the rest its defaults."""
    params = xlc.CommonParams()
    params.model.path = str(gguf_path())
    params.n_ctx = context
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    return params


def llama_cpp(sets: dict, new_tokens: int, threads: int, repeats: int) -> dict:
    """llama.cpp on the same GGUF and prompt ids, greedy; None values and a reason when it cannot run.
    Measured at `threads` (the race's setting) and, where that is more than one, at every smaller count too
    (`by_threads`): on a small VM llama.cpp's spinning workers can share the cores badly, and a race should
    show the peer at its best, not only at our setting."""
    try:
        import xllamacpp as xlc
    except ImportError as e:
        return dict(available=False, reason=f"xllamacpp is not installed ({e}); pip install xllamacpp")
    out = dict(available=True, version=getattr(xlc, "__version__", "unknown"), by_threads={})
    for n in range(threads, 0, -1):
        measured = _llama_cpp_at(xlc, sets, new_tokens, n, repeats)
        if n == threads:
            out.update(measured)
        out["by_threads"][str(n)] = {name: m["decode_tok_s"] for name, m in measured.items()}
    return out


def _llama_cpp_at(xlc, sets: dict, new_tokens: int, threads: int, repeats: int) -> dict:
    params = llama_cpp_params(xlc, threads, 2048)
    params.sampling.temp = 0.0
    server = xlc.Server(params)
    out = {}
    for name, prompts in sets.items():
        runs = []
        for _ in range(repeats + 1):  # the first run warms the server up, untimed
            runs.append([server.handle_completions({"prompt": ids[0].tolist(), "max_tokens": new_tokens,
                                                    "temperature": 0.0, "ignore_eos": True})
                         for ids in prompts])
        runs = runs[1:]
        timing = lambda run, key: sum(r["timings"][key] for r in run)  # noqa: E731
        out[name] = dict(
            decode_tok_s=statistics.median(timing(run, "predicted_n") / timing(run, "predicted_ms") * 1e3 for run in runs),
            prefill_tok_s=statistics.median(timing(run, "prompt_n") / timing(run, "prompt_ms") * 1e3 for run in runs),
            texts=[r["choices"][0]["text"] for r in runs[-1]])
    del server
    return out


def bench_stack(new_tokens: int = 128, threads: int = 2, repeats: int = 3, eval_tokens: int = 512,
                out: str | None = results_file("stack_results.json"), steps=None) -> dict:
    torch.set_num_threads(threads)
    steps = steps or STEPS
    bandwidth = memory_bandwidth_gb_s()
    print(machine_line(), f"| memory bandwidth {bandwidth:.1f} GB/s", flush=True)
    tok = eval_ids = sets = None
    rows, models, reference = [], {}, {}
    for label, stack, drafter, cache in progress(steps, desc="bench stack: steps"):
        key = json.dumps(stack, sort_keys=True)
        if key not in models:
            models.clear()                                       # one model in memory at a time
            models[key] = load_stack(**stack)
        model, tok = models[key]
        if eval_ids is None:
            eval_ids = torch.tensor(tok.encode(asset("heldout.txt").read_text())[:eval_tokens])
            sets = {"grounded": [chat_ids(tok, m) for m in GROUNDED], "open-ended": [chat_ids(tok, m) for m in OPEN_ENDED]}
        n_new = new_tokens if cache != "none" else min(new_tokens, 32)   # no cache is quadratic: fewer tokens
        warm = next(iter(sets.values()))[0]
        for d in ([None, drafter] if drafter else [None]):           # compile every width the step uses
            timed_decode(model, warm, 8, make_drafter(d, model) if d else None, cache)
        row = dict(label=label, stack=describe(**stack), drafter=drafter, cache=cache, new_tokens=n_new,
                   model_bytes=model_bytes(model))
        inner = getattr(model, "model", model)                        # the compiled wrapper's eager model
        nll, count = nll_sum(inner, eval_ids, eval_tokens)
        row["perplexity"] = float(torch.tensor(nll / count).exp())
        with PeakRSS() as memory:                                     # both sets' runs: the step decoding
            for name, prompts in sets.items():
                m = measure_set(model, prompts, n_new, drafter, cache, repeats if cache != "none" else 1)
                tokens = m.pop("tokens")
                if label.startswith("+ static"):
                    reference[name] = tokens                          # float32 greedy: the reference
                ref = reference.get(name)
                m["agree_with_float32"] = (sum(leading_agreement(a, b) for a, b in zip(tokens, ref)) / len(tokens)
                                           if ref else None)
                if drafter:       # lossless: the same tokens as plain decoding of the same model (untimed)
                    plain = [timed_decode(model, ids, n_new, None, cache)["tokens"] for ids in prompts]
                    m["same_as_plain"] = sum(a == b for a, b in zip(tokens, plain))
                m["bytes_per_token"] = row["model_bytes"] / m["tokens_per_forward"]
                row[name] = m
        row["peak_rss_mb"] = round(memory.peak_mb, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    peer = llama_cpp(sets, new_tokens, threads, repeats)
    if peer["available"]:
        for name in sets:           # against the float32 static step's tokens, where the race ran that step
            texts, refs = peer[name].pop("texts"), reference.get(name)
            peer[name]["agree_with_float32"] = sum(
                leading_agreement(tok.encode(t, disallowed_special=())[:new_tokens], ref)
                for t, ref in zip(texts, refs)) / len(refs) if refs else None
    result = dict(settings=dict(new_tokens=new_tokens, repeats=repeats, eval_tokens=eval_tokens,
                                prompts={"grounded": GROUNDED, "open-ended": OPEN_ENDED}, **machine_settings()),
                  memory_bandwidth_gb_s=round(bandwidth, 2), rows=rows, llama_cpp=peer)
    print_table(result)
    write_results(result, out)
    return result


def print_table(result: dict):
    rows, peer = result["rows"], result["llama_cpp"]
    print(result["settings"]["machine"], f"| memory bandwidth {result['memory_bandwidth_gb_s']} GB/s")
    for name in ("grounded", "open-ended"):
        ref = rows[0][name]["decode_tok_s"]
        llama = peer[name]["decode_tok_s"] if peer.get("available") else None
        print(f"\n{name} prompts: decode tok/s (x first step{', x llama.cpp' if llama else ''}), prefill tok/s, "
              f"MB read per token, perplexity, leading tokens shared with float32 greedy, peak RSS MB while decoding")
        for r in rows:
            m = r[name]
            vs = f"{m['decode_tok_s'] / llama:5.2f}x llama.cpp" if llama else ""
            same = f"  lossless {m['same_as_plain']}/3" if "same_as_plain" in m else ""
            agree = f"{m['agree_with_float32']:6.1f}" if m["agree_with_float32"] is not None else "     -"
            rss = f"{r['peak_rss_mb']:8.0f}" if "peak_rss_mb" in r else ""
            print(f"  {r['label']:<24}{m['decode_tok_s']:7.1f} ({m['decode_tok_s'] / ref:5.1f}x) {vs}"
                  f"{m['prefill_tok_s']:8.0f}{m['bytes_per_token'] / 1e6:8.1f}{r['perplexity']:8.2f}{agree}{rss}{same}")
        if llama:
            agree = peer[name]["agree_with_float32"]
            print(f"  {'llama.cpp (Q4_1 GGUF)':<24}{llama:7.1f}  {'':>8}{peer[name]['prefill_tok_s']:8.0f}"
                  f"{'':>16}" + (f"{agree:6.1f}" if agree is not None else "     -"))
            for n, by_set in sorted(peer.get("by_threads", {}).items()):
                print(f"  {'llama.cpp, ' + n + ' thread(s)':<24}{by_set[name]:7.1f}")
        else:
            print(f"  llama.cpp: {peer.get('reason')}")
