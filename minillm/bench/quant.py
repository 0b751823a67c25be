"""`python -m minillm bench quant`: perplexity, bytes and speed of SmolLM2 under each dtype, quantization
and kernel, every figure a ratio to the float32 eager model measured in the same run.

Quality: perplexity on the start of two held-out texts of different domains, minillm/assets/heldout.txt (Flask's
docs, prose) and minillm/assets/heldout_code.txt (Flask's modules, Python); GPTQ and AWQ calibrate on
minillm/assets/calibration.txt (SmolLM2's own answers, Shakespeare, requests' code), disjoint from both.
`--quality-only` recomputes the perplexities (deterministic: the same on any machine) and keeps the
speed figures of the committed results file, saying so in its settings.
Speed, four tables:
  decode     tokens/s of greedy decoding through decoding.decode_steps, each configuration eager and
             compiled (compile_decode); quantized ones also with the kernels `auto` did not choose
             (the dequantize-then-matmul reference, the packed kernel fed float32) to show why it chose,
             and FUSE_COMPARE also compiled with its projections apart (backends/fuse.py) to show what fusing buys;
             and native (backends/native_step.py: every block in one C++ call), each linear on one kernel at every width
             ("native", what speculation uses) and on the faster at each width ("native, auto");
             all models are built first, then decode in turns, median of 3 rounds
  forward    the cost of one forward over T = 1, 2, 4, 8, 16 new tokens after a 256-token context (native ones
             timed in turns with the compiled one),
             relative to T = 1: what speculative and tree decoding (chapters 5-6) pay to verify T tokens
             (widths timed in turns); compiled, also the linears alone over 1 and 8 rows, to say where
             the 8-token step's extra time goes
  limit      memory bandwidth / bytes read per step, the speed a decode step could reach if it only
             read its weights
  split      what a compiled 8-token forward costs beyond a 1-token one: the blocks' linears alone, the
             head alone, and the rest (attention, norms, rotary, the calls between them); which attention
             the compiled step chose (backends/compiled.py: the kernel of native/attention.py or inductor's code, by a
             short measurement), and for the bfloat16 model also the forward costs with inductor's code,
             for FUSE_COMPARE with its projections apart, each timed in turns with the usual compiled step
Every table is printed under the machine line (CPU capability, threads, torch) and the bandwidth.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

from ..assets import asset
from ..backends.compiled import ATTENTION_CHOICES, compile_decode
from ..backends.native_step import native_decode
from ..backends.prepack import linear_kernels
from ..cache.kv_cache import StaticCache
from ..model.loading import load_pretrained
from ..model.perplexity import nll_sum
from ..progress import progress
from ..quant import kernels_used, model_bytes, quantize, set_impl
from ..quant.calibration import calibration_ids
from .timing import (
    decode_tok_s,
    machine_line,
    machine_settings,
    median_of_rounds,
    memory_bandwidth_gb_s,
    results_file,
    write_results,
)

# (label, dtype, method, options, speed): speed "full" = eager + compiled + the other kernels, "fast" = eager +
# compiled, None = perplexity and bytes only (GPTQ and AWQ store the int4 g64 format: same speed).
# 576 = 4.5 x 128, so "g128" is g64 here: the nearest group size dividing every width.
CONFIGS = [
    ("fp32", "float32", "none", {}, "fast"),
    ("bf16", "bfloat16", "none", {}, "fast"),
    ("int8", "float32", "int8", {}, "full"),
    ("int8 + int8 head", "float32", "int8", dict(head="int8"), "fast"),
    ("int4 g32 asym", "float32", "int4", dict(group_size=32, symmetric=False), "fast"),  # = the GGUF's Q4_1
    ("int4 g64", "float32", "int4", dict(group_size=64, symmetric=True), "full"),
    ("int4 g64 + int8 head", "float32", "int4", dict(group_size=64, symmetric=True, head="int8"), "fast"),
    ("bf16 int4 g64 + int8 head", "bfloat16", "int4", dict(group_size=64, symmetric=True, head="int8"), "fast"),
    # a bfloat16 model end to end, as chapter 8 stacks it: nothing is cast to and from float32 between the kernels
    ("bf16 int8", "bfloat16", "int8", {}, "fast"),
    ("bf16 int4 g32 asym + int8 head", "bfloat16", "int4", dict(group_size=32, symmetric=False, head="int8"), "fast"),
    # act-order and the paper's damping 0.01, calibrated on the mixture (6,144 tokens): measured 2026-11-24, prose /
    # code perplexity 25.71 / 12.51; damp 0.1: 26.45 / 12.91; without act-order: 30.00 / 15.15 (RTN 33.49 / 15.20).
    ("GPTQ int4 g64", "float32", "gptq", dict(group_size=64, symmetric=True, act_order=True, damp=0.01), None),
    ("AWQ int4 g64", "float32", "awq", dict(group_size=64, symmetric=True), None),
]
WIDTHS = (1, 2, 4, 8, 16)
ATTENTION_COMPARE = "bf16"   # the configuration whose compiled forwards are also timed with inductor's attention
FUSE_COMPARE = "int4 g64 + int8 head"   # ... and the one also timed with q/k/v and gate/up apart (backends/fuse.py)


def forward_costs(model, context_ids, widths=WIDTHS, repeats: int = 11) -> dict:
    """Median seconds of one forward over T new tokens after `context_ids` (1, C) in a static cache, the widths
    timed in turns (median_of_rounds; two untimed rounds first: compiled, those compile)."""
    return forward_costs_in_turns({0: model}, context_ids, widths, repeats)[0]


def forward_costs_in_turns(models: dict, context_ids, widths=WIDTHS, repeats: int = 11) -> dict:
    """forward_costs of several models ({name: model} -> {name: {T: seconds}}), every width of every model timed
    in each round, so that a slow spell of this shared VM falls on all of them alike."""
    C = context_ids.shape[1]
    caches = {name: StaticCache(m.config, 1, 512, dtype=next(m.parameters()).dtype) for name, m in models.items()}

    def forward(name, T):
        start = time.perf_counter()
        models[name](context_ids[:, :T], cache=caches[name])
        seconds = time.perf_counter() - start
        caches[name].truncate(C)
        return seconds

    with torch.inference_mode():
        for name, m in models.items():
            m(context_ids, cache=caches[name])
        t = median_of_rounds({(name, T): lambda n=name, T=T: forward(n, T) for name in models for T in widths},
                             repeats, warmup=2)
    return {name: {T: t[name, T] for T in widths} for name in models}


def linear_costs(model, widths=(1, 8), repeats: int = 11) -> dict:
    """Median milliseconds of calling every linear of the 30 blocks in turn ("body"), and the output head, on
    T rows: the matmuls of a T-token step alone, weights read from memory as in a step (the body's are several
    times the CPU's last-level cache), timed in turns. Whatever a T-token step costs beyond these is attention,
    norms, rotary and the calls between them. Also "body in cache": the first block's linears called once per
    block, the same calls on weights re-read from the caches (one block's: 1.8-14 MB): where that costs about
    what "body" costs, the kernels are bound by their arithmetic on this CPU, not by memory. "body_mb": the
    bytes of the body's weights as stored, which "body" streams once per call round."""
    dtype = model.tok_embeddings.weight.dtype
    linears = lambda mod: [m for m in mod.modules() if hasattr(m, "in_features") and not list(m.children())]  # noqa: E731
    body = linears(model.layers)
    parts = {"body": body, "head": [model.output], "body in cache": linears(model.layers[0]) * len(model.layers)}
    xs = {(T, k): torch.randn(T, k, dtype=dtype) for T in widths for k in {m.in_features for m in body + [model.output]}}

    def call(part, T):
        start = time.perf_counter()
        for m in parts[part]:
            m(xs[T, m.in_features])
        return time.perf_counter() - start

    with torch.inference_mode():
        ms = median_of_rounds({(part, T): lambda p=part, T=T: call(p, T) for part in parts for T in widths},
                              repeats, warmup=1)
    out = {part: {T: round(1e3 * ms[part, T], 2) for T in widths} for part in parts}
    out["body_mb"] = round(sum(model_bytes(m) for m in body) / 1e6, 1)
    return out


def decode_rounds(racers: dict, prompt, new_tokens: int, rounds: int = 3) -> dict:
    """Decode tokens/s of every model in `racers` ({key: model}), all decoding in turns, median of `rounds`. Every
    ratio in the table divides by the float32 eager figure, so all are timed alike: on a shared VM a slow spell
    (seen: float32 at 12.4 tok/s against 16-18 in the runs around it) then slows one round of every model
    instead of every decode of one."""
    tok_s = median_of_rounds({key: lambda m=model: decode_tok_s(m, prompt, new_tokens) for key, model in racers.items()},
                             rounds, desc="bench quant: decode rounds")
    return {key: round(v, 2) for key, v in tok_s.items()}


def quality(model, texts: dict, context: int) -> dict:
    """Perplexity of `model` on each of `texts` ({name: ids (n,)})."""
    out = {}
    for name, ids in texts.items():
        nll, count = nll_sum(model, ids, context)
        out[name] = float(torch.tensor(nll / count).exp())
    return out


def bench_quant(eval_tokens: int = 1024, context: int = 512, calib_samples: int = 24, calib_len: int = 256,
                new_tokens: int = 32, out: str | None = results_file("quant_results.json"),
                quality_only: bool = False) -> dict:
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    base, tok = load_pretrained("smollm2-135m")
    eval_ids = torch.tensor(tok.encode(asset("heldout.txt").read_text())[:eval_tokens])
    code_ids = torch.tensor(tok.encode(asset("heldout_code.txt").read_text())[:eval_tokens])
    calib = calibration_ids(tok, calib_samples, calib_len)
    prompt, context_ids = eval_ids[None, :16], eval_ids[None, :256]
    if quality_only and not out:
        raise ValueError("bench quant --quality-only keeps the speed figures of a results file: none here (no data/)")
    previous = json.loads(Path(out).read_text()) if quality_only else None
    old_rows = {r["label"]: r for r in previous["rows"]} if previous else {}
    bandwidth = previous["memory_bandwidth_gb_s"] if previous else memory_bandwidth_gb_s()
    log(machine_line(), f"memory bandwidth {bandwidth:.1f} GB/s")
    rows, racers = [], {}
    for label, dtype, method, options, speed in progress(CONFIGS, desc="bench quant: configurations"):
        start = time.perf_counter()
        model = copy.deepcopy(base).to(getattr(torch, dtype))
        model = quantize(model, method, calibration=calib, **options)
        row = dict(old_rows.get(label, {}), label=label, dtype=dtype, method=method, **options,
                   quantize_s=round(time.perf_counter() - start, 1))
        ppl = quality(model, {"prose": eval_ids, "code": code_ids}, context)
        row.update(perplexity=ppl["prose"], perplexity_code=ppl["code"], tokens=len(eval_ids) - 1,
                   model_bytes=model_bytes(model), kernels=kernels_used(model))
        if speed and not quality_only:
            row["forward_ms"] = {"eager": {T: round(s * 1e3, 2) for T, s in forward_costs(model, context_ids).items()}}
            racers[label, "eager"] = model
            if speed == "full":            # the kernels auto did not choose, each on a copy of its own
                for impl, act, name in (("ref", None, "ref"), ("packed", torch.float32, "packed/float32")):
                    racers[label, name] = copy.deepcopy(model)
                    set_impl(racers[label, name], impl, act)
            # a copy: compile_decode prepacks the plain linears (where that measured faster, backends/prepack.py), which
            # would speed up the eager model's decode too
            fast = compile_decode(copy.deepcopy(model))
            row["linears_compiled"] = linear_kernels(fast.model)
            start = time.perf_counter()
            row["forward_ms"]["compiled"] = {T: round(s * 1e3, 2) for T, s in forward_costs(fast, context_ids).items()}
            row["compile_s"] = round(time.perf_counter() - start, 1)  # five widths compiled, then timed
            row["attention"] = {"1 row": fast.attention[1], "wider": fast.attention[max(fast.widths)]}
            others = {}   # the same model compiled another way, its forwards timed in turns with this one's
            if label == ATTENTION_COMPARE:
                others["compiled, inductor attention"] = compile_decode(copy.deepcopy(model), attention="inductor")
            if label == FUSE_COMPARE:
                others["compiled, unfused"] = racers[label, "compiled, unfused"] = compile_decode(
                    copy.deepcopy(model), fuse=False)
            try:        # every width on the row-consistent kernels (backends/compiled.py), where they take this model
                others["compiled, consistent"] = compile_decode(copy.deepcopy(model), consistent=True)
            except ValueError as e:
                row["consistent"] = str(e)
            if others:
                for key, costs in forward_costs_in_turns(dict(others, compiled=fast), context_ids).items():
                    row["forward_ms"][key] = {T: round(s * 1e3, 2) for T, s in costs.items()}
            del others
            row["linear_ms"] = linear_costs(fast)   # its linears as the compiled step runs them (prepacked)
            racers[label, "compiled"] = fast
            try:        # every block in one C++ call (backends/native_step.py), one kernel per linear at every width, and per width
                natives = {"native": native_decode(copy.deepcopy(model)),
                           "native, auto": native_decode(copy.deepcopy(model), kernel="auto")}
            except ValueError as e:
                row["native"] = str(e)
            else:
                row["native"] = {k: n.extra_repr() for k, n in natives.items()}
                for key, costs in forward_costs_in_turns(dict(natives, compiled=fast), context_ids).items():
                    if key != "compiled":
                        row["forward_ms"][key] = {T: round(s * 1e3, 2) for T, s in costs.items()}
                racers.update({(label, k): n for k, n in natives.items()})
        row["bytes_read_limit_tok_s"] = round(bandwidth * 1e9 / row["model_bytes"], 1)
        if hasattr(model, "awq_alphas"):
            row["awq_alphas"] = model.awq_alphas
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "awq_alphas"}))
    if racers:                   # every model built: now the decodes, all of them in each round
        speeds = decode_rounds(racers, prompt, new_tokens)
        for row in rows:
            kinds = {kind: v for (label, kind), v in speeds.items() if label == row["label"]}
            if kinds:
                row["decode_tok_s"] = {k: kinds[k] for k in ("eager", "ref", "packed/float32", "compiled",
                                                               "compiled, unfused", "native", "native, auto")
                                       if k in kinds}
                log(row["label"], json.dumps(row["decode_tok_s"]))
    timings = {f"{rows} rows": t for (*_, dtype, threads, rows), t in ATTENTION_CHOICES.items()
               if dtype == torch.bfloat16}
    settings = dict(eval_text="minillm/assets/heldout.txt", eval_text_2="minillm/assets/heldout_code.txt", eval_tokens=eval_tokens,
                    context=context, calibration_text="minillm/assets/calibration.txt (mixture)", calib_samples=calib_samples,
                    calib_len=calib_len, quality_date=time.strftime("%Y-%m-%d"))
    if previous:   # the speed figures stay those of the run that measured them
        settings = dict(previous["settings"], **settings, speed_note="speed figures from the run dated "
                        f"{previous['settings']['date']}; perplexities recomputed with --quality-only")
    else:
        settings.update(decode_prompt_tokens=16, decode_new_tokens=new_tokens, forward_context=256,
                        **machine_settings())
    result = dict(settings=settings, memory_bandwidth_gb_s=round(bandwidth, 2), rows=rows)
    if timings and not quality_only:
        result["attention_us_bf16"] = timings      # one layer's attention, inductor's code vs the kernel
    print_table(result)
    write_results(result, out, log)
    return result


def print_table(result: dict):
    """The three tables: quality and bytes, decode speed, forward cost by width."""
    rows = result["rows"]
    base = rows[0]
    print(result["settings"]["machine"], f"| memory bandwidth {result['memory_bandwidth_gb_s']} GB/s")
    print(f"{'model':<27}{'ppl prose':>10}{'vs fp32':>9}{'ppl code':>10}{'vs fp32':>9}{'MB':>8}  kernels")
    for r in rows:
        code = r.get("perplexity_code", float("nan"))
        print(f"{r['label']:<27}{r['perplexity']:>10.3f}{r['perplexity'] / base['perplexity'] - 1:>+9.2%}"
              f"{code:>10.3f}{code / base.get('perplexity_code', float('nan')) - 1:>+9.2%}"
              f"{r['model_bytes'] / 1e6:>8.1f}  {r['kernels'] or 'float'}")
    ref = base["decode_tok_s"]["eager"]
    print(f"\ndecode tok/s (x fp32 eager = {ref})     {'eager':>14}{'compiled':>16}{'limit':>8}  other kernels")
    for r in rows:
        if "decode_tok_s" in r:
            d = r["decode_tok_s"]
            other = "  ".join(f"{k} {v} ({v / ref:.2f}x)" for k, v in d.items() if k not in ("eager", "compiled"))
            print(f"{r['label']:<38}{d['eager']:>7.1f} ({d['eager'] / ref:.2f}x){d['compiled']:>8.1f} "
                  f"({d['compiled'] / ref:.2f}x){r['bytes_read_limit_tok_s']:>8.1f}  {other}")
    print(f"\nforward over T new tokens after {result['settings']['forward_context']}, cost / cost at T=1 "
          f"(eager | compiled)")
    print(f"{'model':<27}" + "".join(f"{'T=' + str(T):>13}" for T in WIDTHS))
    for r in rows:
        if "forward_ms" in r:
            e, c = r["forward_ms"]["eager"], r["forward_ms"]["compiled"]
            cells = [(_at(e, T) / _at(e, 1), _at(c, T) / _at(c, 1)) for T in WIDTHS]
            print(f"{r['label']:<27}" + "".join(f"{a:>7.2f}|{b:<5.2f}" for a, b in cells))
            for key, name in (("compiled, inductor attention", "  inductor attention"),
                              ("compiled, unfused", "  projections unfused"), ("compiled, consistent", "  consistent"),
                              ("native", "  native"), ("native, auto", "  native, auto")):
                if key in r["forward_ms"]:
                    other = r["forward_ms"][key]
                    name += f" ({_at(other, 1):.1f} ms)" if key.startswith("native") else ""
                    print(f"{name:<27}" + "".join(f"{'':>7} {_at(other, T) / _at(other, 1):<5.2f}" for T in WIDTHS))
    print("\nwhere a compiled 8-token step's extra time goes (ms; linears alone: each block's, then the head)")
    print(f"{'model':<27}{'step 1 -> 8':>16}{'blocks 1 -> 8':>16}{'head 1 -> 8':>14}{'the rest':>10}  attention")
    for r in rows:
        if "linear_ms" in r:
            extra = eight_token_extra(r)
            c, lin = r["forward_ms"]["compiled"], r["linear_ms"]
            pair = lambda d: f"{_at(d, 1):.1f} -> {_at(d, 8):.1f}"  # noqa: E731
            attn = r.get("attention", {})
            print(f"{r['label']:<27}{pair(c):>16}{pair(lin['body']):>16}{pair(lin['head']):>14}{extra['rest']:>+10.1f}"
                  f"  {attn.get('1 row', '?')} | {attn.get('wider', '?')}")
    cached = [r for r in rows if "body in cache" in r.get("linear_ms", {})]     # (results files before 2026-12-03: none)
    if cached:
        print("\nthe blocks' linears on 1 row (ms): weights streamed from memory, as in a step, against one block's "
              "weights\nre-read from the caches as often; about equal: bound by the kernels' arithmetic here, not by memory")
        print(f"{'model':<27}{'streamed':>10}{'in cache':>10}{'MB':>8}{'streamed at':>14}")
    for r in cached:
        lin = r["linear_ms"]
        body = _at(lin["body"], 1)
        print(f"{r['label']:<27}{body:>10.2f}{_at(lin['body in cache'], 1):>10.2f}{lin['body_mb']:>8.1f}"
              f"{lin['body_mb'] / body:>9.1f} GB/s")
    for r in rows:
        if "compiled, unfused" in r.get("forward_ms", {}):
            fused, apart = r["forward_ms"]["compiled"], r["forward_ms"]["compiled, unfused"]
            print(f"{r['label']}, compiled, q/k/v and gate/up fused vs apart (ms): " + ", ".join(
                f"T={T} {_at(fused, T):.2f} vs {_at(apart, T):.2f}" for T in (1, 8)))
    for rows, t in result.get("attention_us_bf16", {}).items():
        print(f"one layer's bfloat16 attention, {rows} (us): inductor {t['inductor']}, kernel {t['kernel']}")


def _at(d: dict, T: int) -> float:
    return d[T] if T in d else d[str(T)]      # int keys as measured, str keys as read back from JSON


def eight_token_extra(row: dict) -> dict:
    """What a compiled 8-token forward costs beyond a 1-token one (ms), split into the blocks' linears, the
    head and the rest (attention, norms, rotary, calls), from one row of the results."""
    step, lin = row["forward_ms"]["compiled"], row["linear_ms"]
    out = {"step": _at(step, 8) - _at(step, 1), "blocks": _at(lin["body"], 8) - _at(lin["body"], 1),
           "head": _at(lin["head"], 8) - _at(lin["head"], 1)}
    out["rest"] = out["step"] - out["blocks"] - out["head"]
    return {k: round(v, 2) for k, v in out.items()}
