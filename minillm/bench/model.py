"""`python -m minillm bench`: prefill and decode speed and peak memory of SmolLM2, minillm vs HF transformers.

Each engine runs in a fresh subprocess, so that its peak resident memory (ru_maxrss) is its own
and neither warms the other's caches. Both decode greedily with a KV cache, one token per forward,
from the same prompt, in float32 on the CPU, with the same number of threads.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

from ..decoding.loop import decode_steps
from ..model.loading import gguf_path, load_pretrained
from ..progress import progress
from ..tokenization.tokenizer import Tokenizer
from .timing import machine_line, machine_settings, results_file, write_results

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden screw press. ") * 8


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_minillm(prompt_tokens: int, new_tokens: int) -> dict:
    """The package's own decoding loop: the prefill yields the first token, then one token per forward."""
    (model, tok), load_s = _timed(lambda: load_pretrained("smollm2-135m"))
    ids = torch.tensor([tok.encode(PROMPT)[:prompt_tokens]])
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
    steps = decode_steps(model, ids, new_tokens + 1, eos_token_id=None)
    _, prefill_s = _timed(lambda: next(steps))
    _, decode_s = _timed(lambda: sum(1 for _ in steps))
    return dict(load_s=load_s, prefill_s=prefill_s, decode_s=decode_s)


def run_hf(prompt_tokens: int, new_tokens: int) -> dict:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = gguf_path()
    (model), load_s = _timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval())
    ids = torch.tensor([Tokenizer.from_gguf(path).encode(PROMPT)[:prompt_tokens]])
    with torch.inference_mode():
        model(ids[:, :8])
        out, prefill_s = _timed(lambda: model(ids, use_cache=True))
        past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(next_id, past_key_values=past, use_cache=True)
            past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - start
    return dict(load_s=load_s, prefill_s=prefill_s, decode_s=decode_s)


ENGINES = {"minillm": run_minillm, "hf": run_hf}


def worker(engine: str, prompt_tokens: int, new_tokens: int):
    result = ENGINES[engine](prompt_tokens, new_tokens)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def bench_model(prompt_tokens: int = 128, new_tokens: int = 64, engines=("minillm", "hf"), out=None) -> dict:
    results = {}
    for engine in progress(engines, desc="bench model: engines (one process each)"):
        if engine == "hf":
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("HF transformers is not installed: skipping the comparison")
                continue
        cmd = [sys.executable, "-m", "minillm.bench.model", engine, str(prompt_tokens), str(new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of {engine} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["prefill_tok_s"] = prompt_tokens / r["prefill_s"]
        r["decode_tok_s"] = new_tokens / r["decode_s"]
        results[engine] = r
    print(machine_line())
    print(f"SmolLM2-135M, float32, "
          f"prompt {prompt_tokens} tokens, {new_tokens} decoded greedily with a KV cache")
    print(f"{'engine':<10}{'load s':>9}{'prefill tok/s':>16}{'decode tok/s':>15}{'peak RSS MB':>14}")
    for name, r in results.items():
        print(f"{name:<10}{r['load_s']:>9.2f}{r['prefill_tok_s']:>16.1f}{r['decode_tok_s']:>15.1f}{r['peak_rss_mb']:>14.0f}")
    if "hf" in results and "minillm" in results:
        ours, hf = results["minillm"], results["hf"]
        print(f"minillm / HF: prefill {ours['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x, "
              f"decode {ours['decode_tok_s'] / hf['decode_tok_s']:.2f}x, "
              f"peak memory {ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x")
    result = dict(engines=results, settings=dict(model="SmolLM2-135M float32", prompt_tokens=prompt_tokens,
                                                 new_tokens=new_tokens, **machine_settings()))
    write_results(result, out if out is not None else results_file("model_results.json"))
    return result


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
