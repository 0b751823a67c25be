"""One place that builds SmolLM2 the way a command asks: dtype, quantization (with or without the head)
and a compiled (or native) decode step, in that order. The CLI and the benches call it; chapter 8 stacks on it.

    model, tok = load_stack(dtype="bfloat16", quant="int4", head="int8", compile=True)
"""
from __future__ import annotations

import time

import torch

from ..decoding.loop import decode
from ..model.loading import load_pretrained
from ..progress import progress as progress_bar
from ..quant import DEFAULT_GROUP_SIZE, calibration_ids, quantize
from . import autotune
from .compiled import compile_decode
from .native_step import native_decode


def load_stack(dtype="float32", quant: str = "none", group_size: int = DEFAULT_GROUP_SIZE, head: str | None = None,
               compile: bool = False, symmetric: bool | None = None, progress: bool = False,
               fixed_width: int | None = None, consistent: bool = False, native: bool = False):
    """(model, tokenizer). quant: none | int8 | int4 | gptq | awq (gptq/awq calibrate on the mixture
    minillm/assets/calibration.txt, 24 x 256 tokens, GPTQ with act-order: the configuration `bench quant` measured,
    a minute or two on 2 cores); head: None (float) | "int8"; compile: wrap in compile_decode;
    symmetric: int4 scales only (default True); False with group_size 32 holds the GGUF's Q4_1 weights exactly;
    progress: a bar on stderr while GPTQ/AWQ calibrate, layer by layer (the GGUF's conversion shows its
    own bar where stderr is a terminal); fixed_width: with compile, every decode and verify step runs the
    one graph of this width (compiled.py: plain and speculative decoding then make the same tokens);
    consistent: with compile, every width computes a token's logits alike (compiled.py), the other way to that;
    native: steps of 1-16 tokens as one C++ call each (native_step.py), instead of compiled ones."""
    if (fixed_width is not None or consistent) and not compile:
        raise ValueError("fixed_width and consistent are kinds of compiled step: give compile=True (--compile) too")
    if native and compile:
        raise ValueError("native and compiled are two kinds of step: choose one (--native or --compile)")
    model, tok = load_pretrained("smollm2-135m", dtype=dtype, progress=None if progress else False)
    calibration = calibration_ids(tok, 24, 256) if quant in ("gptq", "awq") else None
    options = dict(act_order=True) if quant == "gptq" else {}
    with progress_bar(total=model.config.n_layers, desc=f"{quant} calibration, layers",
                      show=progress and calibration is not None) as bar:
        if calibration is not None:
            options["progress"] = lambda layer: bar.update(1)
        model = quantize(model, quant, group_size=group_size, symmetric=symmetric, calibration=calibration, head=head,
                         **options)
    if compile:
        model = compile_stack(model, fixed_width, consistent)
    if native:
        model = native_decode(model)
    return model, tok


def compile_stack(model, fixed_width: int | None = None, consistent: bool = False):
    """compile_decode with the usual widths, or with the one width `fixed_width`, or consistent (compiled.py)."""
    if fixed_width is not None:
        return compile_decode(model, widths=(fixed_width,))
    return compile_decode(model, consistent=consistent)


def describe(dtype="float32", quant: str = "none", group_size: int = DEFAULT_GROUP_SIZE, head: str | None = None,
             compile: bool = False, symmetric: bool | None = None, fixed_width: int | None = None,
             consistent: bool = False, native: bool = False) -> str:
    """A short name for a stack: "bfloat16, int4 g64 + int8 head, compiled (fixed width 8)"."""
    parts = [str(dtype).replace("torch.", "")]
    if quant != "none":
        parts.append(quant + (f" g{group_size}" if quant != "int8" else "") + (" asym" if symmetric is False else "")
                     + (" + int8 head" if head else ""))
    elif head:
        parts.append("int8 head")
    if compile:
        parts.append("compiled" + (f" (fixed width {fixed_width})" if fixed_width is not None else "")
                     + (" (consistent)" if consistent else ""))
    if native:
        parts.append("native step")
    return ", ".join(parts)


# Chapter 8's race, one technique added per step; bench stack measures them (data/stack_results.json)
INT4H = dict(dtype="bfloat16", quant="int4", group_size=32, symmetric=False, head="int8")  # = the GGUF's Q4_1
# (label, stack, drafter, cache)
STEPS = [
    ("float32, no KV cache", {}, None, "none"),
    ("+ static KV cache", {}, None, "static"),
    ("+ bfloat16", dict(dtype="bfloat16"), None, "static"),
    ("+ int8 weights", dict(dtype="bfloat16", quant="int8"), None, "static"),
    ("+ int4 (Q4_1), int8 head", INT4H, None, "static"),
    ("+ compiled step", dict(INT4H, compile=True), None, "static"),
    # the drafters run every step, plain and verify, on one 8-wide graph (chapters 5-6): their tokens then equal
    # plain decoding's on that graph, bit for bit, and a verify step takes at most 8 tokens (7 drafted)
    ("+ prompt lookup", dict(INT4H, compile=True, fixed_width=8), "ngram", "static"),
    ("+ Token Recycling", dict(INT4H, compile=True, fixed_width=8), "recycling", "static"),
]
# The same race with the native step (native_step.py) in the compiled step's place, `bench stack --native`: the
# same steps up to the compiled one (for comparison in the same run), then the int4 weights on the native step,
# alone and under each drafter. Every native step, plain or verify, runs each linear on one kernel at every width,
# so a drafter's tokens equal plain decoding's with 1-row plain steps (no fixed width). Needs AVX512-BF16.
NATIVE_STEPS = STEPS[:6] + [
    ("native step", dict(INT4H, native=True), None, "static"),
    ("native + prompt lookup", dict(INT4H, native=True), "ngram", "static"),
    ("native + Token Recycling", dict(INT4H, native=True), "recycling", "static"),
]


def fastest_lossless(results: dict, prompts: str = "grounded") -> dict:
    """The fastest step of a race (bench stack's results) whose tokens equal plain greedy decoding of its own
    weights: a step without a drafter always, a drafter step only if it did on every prompt of both
    sets (in bfloat16 near-ties can break that). Returns the step's label, stack (load_stack's
    arguments), drafter, measured decode tok/s and the CPU capability it was measured on."""
    n_prompts = {name: len(p) for name, p in results["settings"]["prompts"].items()}
    best = None
    for (label, stack, drafter, cache), row in zip(STEPS, results["rows"]):
        lossless = drafter is None or all(row[name].get("same_as_plain") == n for name, n in n_prompts.items())
        if lossless and cache != "none" and (best is None or row[prompts]["decode_tok_s"] > best["decode_tok_s"]):
            best = dict(label=label, stack=stack, drafter=drafter, decode_tok_s=row[prompts]["decode_tok_s"],
                        cpu_capability=results["settings"]["cpu_capability"])
    return best


# --fast: the GGUF's own weights (Q4_1 + int8 head, bfloat16 activations) on the backend auto picks, and the drafter
# that decodes fastest here without changing a token, raced on one input-grounded and one open-ended request.
FAST_WEIGHTS = dict(dtype="bfloat16", quant="int4", group_size=32, symmetric=False, head="int8")
FAST_PROMPTS = ("Rewrite this paragraph with correct spelling and punctuation:\n\nthe printing press was invented by "
                "johannes gutenberg around 1440 it used movable metal type and oil based ink",
                "Explain why the sky is blue.")
FAST_DRAFTERS = (None, "ngram", "recycling")


def race_drafters(model, tok, new_tokens: int = 48) -> dict:
    """{drafter or "none": {"tok_s": decode tokens per second over both prompts, "lossless": its tokens equal plain
    greedy decoding's on both}}, greedy, on FAST_PROMPTS; the first forward (the prompt's) is not timed."""
    prompts = [torch.tensor([tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)])
               for p in FAST_PROMPTS]
    plain, figures = None, {}
    for drafter in FAST_DRAFTERS:
        rows, seconds = [], 0.0
        for ids in prompts:
            decode(model, ids, 4, drafter=drafter, eos_token_id=None)                    # warm-up
            start = time.perf_counter()
            rows.append(decode(model, ids, new_tokens, drafter=drafter, eos_token_id=None).tokens)
            seconds += time.perf_counter() - start
        plain = plain if plain is not None else rows
        figures[drafter or "none"] = dict(tok_s=round(len(prompts) * new_tokens / seconds, 1), lossless=rows == plain)
    return figures


def agreement_with_float32(model, tok, new_tokens: int = 48) -> float:
    """Greedy tokens of `model` before the first that differs from the float32 model's, averaged over FAST_PROMPTS:
    the quality cost of lighter weights in the unit a reader sees (chapter 8's agree_with_float32)."""
    reference, _ = load_pretrained("smollm2-135m")
    agree = []
    for text in FAST_PROMPTS:
        ids = torch.tensor([tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)])
        ours, theirs = (decode(m, ids, new_tokens, eos_token_id=None).tokens for m in (model, reference))
        agree.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new_tokens))
    return sum(agree) / len(agree)


def fastest_here(model, tok, backend_label: str, threads: int) -> tuple[str | None, dict, bool]:
    """(--fast's drafter, the race's figures with "agree_with_float32", cached): measured once per machine and
    backend (backends/autotune.py), a few seconds plus one float32 load the first time."""
    key = f"fast | {describe(**FAST_WEIGHTS)} | {backend_label} | {threads} threads"

    def measure():
        return dict(race_drafters(model, tok), agree_with_float32=agreement_with_float32(model, tok))

    figures, cached = autotune.recall(key), True
    race = {k: v for k, v in figures.items() if k != "agree_with_float32"} if isinstance(figures, dict) else {}
    if set(race) != {d or "none" for d in FAST_DRAFTERS} or not isinstance(figures.get("agree_with_float32"), (int, float)) \
            or not all(isinstance(v, dict) and isinstance(v.get("tok_s"), (int, float)) for v in race.values()):
        figures, cached = measure(), False                 # none yet, or a file that says something else
        autotune.remember(key, figures)
        race = {k: v for k, v in figures.items() if k != "agree_with_float32"}
    best = max((k for k, v in race.items() if v["lossless"]), key=lambda k: race[k]["tok_s"])
    return (None if best == "none" else best), figures, cached
