"""`python -m minillm bench serve`: many clients over HTTP, one request at a time vs static vs continuous
batching, and llama.cpp's own server under the same load, in the same run.

The load: `requests` chat prompts that share a system prompt (prefix caching has something to find),
sent as token ids to /v1/completions (both servers then see the very same prompts), streamed, greedy,
`max_tokens` each with EOS ignored (every run makes the same number of tokens). Arrivals: a Poisson
process at each rate (requests per second; "burst": all at t = 0), at most `clients` in flight.
Per request: TTFT (arrival -> first token) and TPOT (mean time per token after the first), measured
by the client. Per run: throughput (tokens / seconds from the first arrival to the last token),
p50/p99 of both, and from our server's /stats the peak KV blocks and the prefix-cache hit rate.
"""
from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import torch

from ..backends.stack import describe
from ..progress import progress
from ..serving.server import MODEL_NAME
from ..tokenization.tokenizer import Tokenizer
from .stack import llama_cpp_params
from .timing import machine_line, machine_settings, results_file, write_results

SYSTEM = ("You are a concise assistant for a course on efficient LLM inference. Answer in plain English, in at "
          "most three sentences, without lists or code unless asked. If a question is unclear, say what you "
          "would need to know. Prefer concrete numbers to adjectives.")
QUESTIONS = ["What is a KV cache?", "Why does batching help a memory-bound decoder?", "What is a token?",
             "Name three prime numbers.", "What is the capital of France?", "How does quantization save memory?",
             "What does a scheduler in a serving engine decide?", "Why are GPUs fast at matrix multiplication?",
             "What is speculative decoding?", "Write a haiku about the sea.", "What is RoPE?",
             "Explain top-p sampling.", "What is a mixture of experts?", "Why does prefill cost more than decode?",
             "What is the attention sink?", "Say hello in French."]
MODES = {"one at a time": "serial", "static batching": "static", "continuous + chunked prefill": "continuous"}


def prompts(tok, n: int) -> list[list[int]]:
    return [tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % 16]}])
            for i in range(n)]


def percentile(values, q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def run_load(url: str, model: str, prompt_ids, max_tokens: int, rate, clients: int, seed: int = 0) -> dict:
    """Send every prompt (streamed, greedy) at Poisson arrival times; return per-request timings."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in prompt_ids:
        arrivals.append(t)
        t += rng.expovariate(rate) if rate != "burst" else 0.0
    records, slots, start = [None] * len(prompt_ids), threading.Semaphore(clients), time.perf_counter()

    def one(i):
        time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        with slots:
            sent, times, usage = time.perf_counter(), [], None
            body = {"model": model, "prompt": prompt_ids[i], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", url + "/completions", json=body, timeout=600) as reply:
                reply.raise_for_status()
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        usage = event["usage"]
                    if event.get("choices") and event["choices"][0].get("text"):
                        times.append(time.perf_counter())
        n = usage["completion_tokens"] if usage else len(times)
        records[i] = dict(arrival=start + arrivals[i], sent=sent, first=times[0] if times else None,
                          last=times[-1] if times else None, tokens=n,
                          cached=((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompt_ids))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ttft = [r["first"] - r["arrival"] for r in records if r["first"]]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in records if r["first"] and r["tokens"] > 1]
    seconds = max(r["last"] for r in records if r["last"]) - min(r["arrival"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return dict(tokens=tokens, seconds=round(seconds, 3), tok_s=round(tokens / seconds, 2),
                ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
                tpot_p50=percentile(tpot, 50), tpot_p99=percentile(tpot, 99),
                cached_tokens=sum(r["cached"] or 0 for r in records))


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now (a server started next takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_server(threads: int, parallel: int, context: int):
    """llama.cpp's server (xllamacpp wheel) on the same GGUF, continuous batching on; (server, url) or (None, why)."""
    try:
        import xllamacpp as xlc
    except ImportError as e:
        return None, f"xllamacpp is not installed ({e})"
    port = free_port()
    params = llama_cpp_params(xlc, threads, context * parallel)
    params.n_parallel, params.cont_batching, params.port = parallel, True, port
    server = xlc.Server(params)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            httpx.get(url + "/models", timeout=5).raise_for_status()
            return server, url
        except httpx.HTTPError:
            time.sleep(0.05)
    return None, f"llama.cpp's server did not answer at {url}"


def minillm_server(policy: str, threads: int, dtype: str, quant: str, max_seqs: int, max_batch_tokens: int):
    """`python -m minillm serve` in its own process, as it is deployed: (process, url) once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "minillm", "serve", "--port", str(port), "--policy", policy,
                                "--threads", str(threads), "--dtype", dtype, "--quant", quant, "--max-seqs",
                                str(max_seqs), "--max-batch-tokens", str(max_batch_tokens)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(1200):
        if process.poll() is not None:
            raise RuntimeError(f"python -m minillm serve exited with status {process.returncode}")
        try:
            httpx.get(url + "/models", timeout=5).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"python -m minillm serve did not answer at {url} within 2 minutes")


def bench_serve(requests: int = 16, max_tokens: int = 32, rates=(0.5, 1.0, "burst"), clients: int = 8,
                max_seqs: int = 8, max_batch_tokens: int = 32, threads: int = 2, dtype: str = "bfloat16",
                quant: str = "none", peer: bool = True, out=results_file("serve_results.json"), log=print) -> dict:
    """Each server runs in its own process with `threads` threads; the clients run in this one."""
    torch.set_num_threads(threads)
    tok = Tokenizer.from_pretrained("smollm2-135m")
    ids = prompts(tok, requests)
    log(machine_line(), f"| SmolLM2 {describe(dtype, quant)} | {requests} requests x {max_tokens} tokens, "
        f"{clients} clients, prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens sharing a system prompt")
    rows = []
    bar = progress(total=len(rates) * (len(MODES) + peer), desc="bench serve: (rate, server) runs")
    for rate in rates:
        for mode, policy in MODES.items():
            process, url = minillm_server(policy, threads, dtype, quant, max_seqs, max_batch_tokens)
            try:
                run_load(url, MODEL_NAME, ids[:1], 2, "burst", 1)                # warm-up, untimed
                before = httpx.get(url.removesuffix("/v1") + "/stats").json()
                row = dict(server="minillm", mode=mode, rate=rate, **run_load(url, MODEL_NAME, ids, max_tokens, rate,
                                                                               clients))
                stats = httpx.get(url.removesuffix("/v1") + "/stats").json()
            finally:
                process.terminate()
                process.wait()
            row.update(peak_blocks=stats["peak_blocks"], prefix_hit_rate=stats["prefix_hit_rate"],
                       preemptions=stats["preemptions"] - before["preemptions"])
            rows.append(row)
            bar.update(1)
            log(format_row(row))
        if peer:
            server, url = llama_cpp_server(threads, max_seqs, 1024)
            if server is None:
                rows.append(dict(server="llama.cpp", mode="unavailable", rate=rate, reason=url))
            else:
                run_load(url, MODEL_NAME, ids[:1], 2, "burst", 1)
                rows.append(dict(server="llama.cpp", mode=f"continuous (n_parallel {max_seqs})", rate=rate,
                                 **run_load(url, MODEL_NAME, ids, max_tokens, rate, clients)))
                del server
            bar.update(1)
            log(format_row(rows[-1]))
    bar.close()
    result = dict(settings=machine_settings(), stack=describe(dtype, quant), requests=requests, max_tokens=max_tokens,
                  clients=clients, max_seqs=max_seqs, max_batch_tokens=max_batch_tokens, rows=rows, **summary(rows))
    log(json.dumps({k: v for k, v in result.items() if k not in ("rows", "settings")}))
    write_results(result, out, log)
    return result


def summary(rows) -> dict:
    """The issue's aims, read from the burst rows (`clients` requests in flight at once)."""
    burst = {r["mode"]: r for r in rows if r["rate"] == "burst" and "tok_s" in r}
    serial, continuous = burst.get("one at a time"), burst.get("continuous + chunked prefill")
    peer = next((r for m, r in burst.items() if m.startswith("continuous (n_parallel")), None)
    if not serial or not continuous:
        return {}
    return dict(continuous_vs_serial=round(continuous["tok_s"] / serial["tok_s"], 2),
                tpot_p99_vs_single=round(continuous["tpot_p99"] / serial["tpot_p50"], 2),
                continuous_vs_llama_cpp=round(continuous["tok_s"] / peer["tok_s"], 2) if peer else None)


def format_row(r) -> str:
    if "tok_s" not in r:
        return f"{r['server']:9s} {r['mode']}: {r.get('reason', '')}"
    ms = lambda v: f"{v * 1e3:7.0f}" if v is not None else "      -"  # noqa: E731
    return (f"{r['server']:9s} {r['mode']:30s} rate {str(r['rate']):5s} {r['tok_s']:7.1f} tok/s  TTFT p50/p99"
            f"{ms(r['ttft_p50'])}{ms(r['ttft_p99'])} ms  TPOT p50/p99{ms(r['tpot_p50'])}{ms(r['tpot_p99'])} ms"
            + (f"  peak blocks {r['peak_blocks']}  prefix hits {r['prefix_hit_rate']:.2f}" if "peak_blocks" in r else
               f"  cached prompt tokens {r['cached_tokens']}"))
