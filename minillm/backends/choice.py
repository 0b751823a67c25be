"""Which backend runs a model's steps, chosen on the machine at hand: the user says what to compute, this says how.

    choice = choose(model, "auto", weights="bfloat16, int4 g64 + int8 head")
    print(choice.line)      # backend: native step, 2 threads (auto: measured here, native 2t 148 tok/s, ...)
    generate(choice.model, ids, 64)

- eager: the model as model/llama.py writes it, PyTorch op by op. The reference every other backend is tested against.
- compiled: torch.compile over each decode width (compiled.py). With a drafter it computes a token alike at every
  width, so speculative and tree decoding give plain decoding's tokens: on cpu_gemv's kernels where they run
  (`consistent`), else one 8-wide graph for every step (drafts cut to 7).
- native: every block of a 1-16-token step in one C++ call (native_step.py); each row computed alike at every width.

"auto" measures the backends that are ready in seconds (eager and, where it runs for these weights, native) at
one thread and at all of them, a 1-token step after a 32-token prompt, and keeps the fastest; the measurement is
remembered per machine and weights (autotune.py). The compiled backend is not measured by auto: compiling takes
tens of seconds in every new process, more than it saves in a chat turn; `--backend compiled` asks for it.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..cache.kv_cache import StaticCache
from ..native import attention as cpu_attention
from ..native import gemv as cpu_gemv
from ..native import logits as cpu_logits
from ..timing import median_seconds
from . import autotune
from . import native_step as cpu_step
from .compiled import _compiler_missing, compile_decode

BACKENDS = ("eager", "compiled", "native")
KERNELS = ("logits", "attention", "gemv", "tiles", "native step")   # the C++ kernels, as probe() names them
LABELS = {"eager": "eager", "compiled": "compiled", "native": "native step"}


@dataclass
class Choice:
    model: nn.Module          # the model to decode with: the one given, or a wrapper around it
    backend: str              # eager | compiled | native
    threads: int
    line: str                 # what was chosen and why, in one line for the user
    label: str                # the backend's part of the stack's name ("native step", "compiled (consistent)")


def unavailable(backend: str, model, cache: str = "static", batch: int = 1, kernels: str = "torch") -> str | None:
    """None if `backend` can run `model`'s decode steps here with this cache, batch and kernel set, else why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return None
    if cache != "static":
        return f"the {backend} step writes a static KV cache, not cache {cache!r}"
    if kernels != "torch":
        return "Triton kernels (--kernels triton) run in the eager model"
    if batch > 1:
        return "several prompts run as one batch on the eager model"
    if backend == "compiled":
        return _compiler_missing()
    if any(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in getattr(model, "layers", nn.Module()).modules()):
        return "float32 weights have no few-row kernel (--dtype bfloat16 or --quant int8/int4 have)"
    return cpu_step.unavailable(model)


def build(model, backend: str, drafter: bool = False) -> tuple[nn.Module, str]:
    """(the model on `backend`, the backend's label). drafter: steps of several widths must compute a token alike."""
    if backend == "eager":
        return model, "eager"
    if backend == "native":
        return cpu_step.native_decode(model), LABELS["native"]
    if not drafter:
        return compile_decode(model), "compiled"
    if cpu_gemv.available() is None:
        try:
            return compile_decode(model, consistent=True), "compiled (consistent)"
        except ValueError:              # float32 linears: no few-row kernel; one width for every step instead
            pass
    return compile_decode(model, widths=(8,)), "compiled (fixed width 8)"


def thread_options() -> list[int]:
    """The thread counts auto tries: one, and every core this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, cores})


@torch.inference_mode()
def step_seconds(model, prompt: int = 32, repeats: int = 8) -> float:
    """Median seconds of a 1-token decode step after a `prompt`-token context (the prompt itself is not timed)."""
    param = next(model.parameters())
    cache = StaticCache(model.config, 1, prompt + 1, dtype=param.dtype)
    ids = torch.arange(100, 100 + prompt)[None] % model.config.vocab_size
    model(ids, cache=cache)
    step = ids[:, -1:]
    return median_seconds(lambda: model(step, cache=cache), repeats=repeats, warmup=2,
                          reset=lambda: cache.truncate(prompt))


def _measure(model, backends, threads) -> dict:
    """{"backend threads": tok/s} for every pair; native runs on a copy, so the model given stays eager."""
    figures = {}
    for backend in backends:
        candidate = model if backend == "eager" else build(copy.deepcopy(model), backend)[0]
        for t in threads:
            torch.set_num_threads(t)
            figures[f"{backend} {t}"] = round(1 / step_seconds(candidate), 1)
        del candidate
    return figures


def choose(model, backend: str = "auto", weights: str = "", threads: int | None = None, drafter: bool = False,
           cache: str = "static", batch: int = 1, kernels: str = "torch") -> Choice:
    """The backend (and, unless given, the thread count) for `model`'s steps; see the module docstring.
    weights: a name for the weights (the stack's description), part of what auto's measurement is remembered by.
    An explicit backend that cannot run here is a ValueError that says why."""
    if backend != "auto":
        why = unavailable(backend, model, cache, batch, kernels)
        if why:
            raise ValueError(f"--backend {backend} cannot run here: {why}")
        t = threads or max(1, (os.cpu_count() or 2) // 2)   # the CLI's default for a command that does not measure
        torch.set_num_threads(t)
        built, label = build(model, backend, drafter)
        return Choice(built, backend, t, f"backend: {label}, {t} thread(s) (as asked)", label)
    not_native = unavailable("native", model, cache, batch, kernels)
    backends = ["eager"] + ([] if not_native else ["native"])
    options = [threads] if threads else thread_options()
    if len(backends) == 1 and len(options) == 1:
        torch.set_num_threads(options[0])
        return Choice(model, "eager", options[0], f"backend: eager, {options[0]} thread(s) (auto: native "
                      f"unavailable: {not_native})", "eager")
    if kernels != "torch":      # Triton's CPU interpreter: nothing to race, and seconds a step to time
        t = threads or torch.get_num_threads()
        torch.set_num_threads(t)
        return Choice(model, "eager", t, f"backend: eager, {t} thread(s) (auto: {not_native})", "eager")
    key = f"backend | {weights} | {'+'.join(backends)} | cache {cache} | threads {threads or 'auto'}"
    figures = autotune.recall(key)
    cached = (isinstance(figures, dict) and set(figures) == {f"{b} {t}" for b in backends for t in options}
              and all(isinstance(v, (int, float)) and v > 0 for v in figures.values()))
    if not cached:
        figures = _measure(model, backends, options)
        autotune.remember(key, figures)
    best = max(figures, key=figures.get)
    name, t = best.split()[0], int(best.split()[1])
    torch.set_num_threads(t)
    built, label = build(model, name, drafter)
    ranked = ", ".join(f"{k}t {v:g}" for k, v in sorted(figures.items(), key=lambda kv: -kv[1]))
    why = f"; native unavailable: {not_native}" if not_native else ""
    line = (f"backend: {label}, {t} thread(s) (auto, {'remembered' if cached else 'measured'} on this CPU, tok/s: "
            f"{ranked}{why}; --backend chooses)")
    return Choice(built, name, t, line, label)


def probe(head_dim: int = 64) -> str:
    """One line: which C++ kernels run on this machine (built on first use), and for each that does not, why.
    e.g. `C++ kernels: logits yes, attention yes, gemv yes, tiles no (needs AMX-BF16 ...), native step yes`."""
    whys = (cpu_logits.available(), cpu_attention.available(head_dim), cpu_gemv.available(),
            cpu_gemv.tiles_available(), cpu_step.available(head_dim))
    short = lambda why: why.strip().splitlines()[0][:100]  # noqa: E731  (a compiler's error can run to pages)
    return "C++ kernels: " + ", ".join(f"{name} yes" if why is None else f"{name} no ({short(why)})"
                                       for name, why in zip(KERNELS, whys))
