"""`python -m minillm bench report`: every results file rendered, so that no figure is typed by hand.

    render(data_dir)            -> (docs/RESULTS.md's text, {png name: figure}, {chapter: headline})
    write_report(root)          writes docs/RESULTS.md and its plots, and the README's chapter table

Reads data/<bench>_results.json (the course machine's runs, one per bench) and data/runs/<machine>/*.json
(other machines' runs, rendered the same way). Each table says which CPU ran it and when.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# (chapter, notebook, what it teaches, the bench whose results give its headline)
CHAPTERS = [
    ("0", "00_minillm", "the model: SmolLM2 from a GGUF file, checked against HF transformers", "model"),
    ("1", "01_tokenization", "byte-level BPE: train, encode, export to tiktoken", "tokenizer"),
    ("2", "02_kv_cache", "KV caching, paged and compressed caches", "kv"),
    ("3", "03_quantization", "int8 / int4, GPTQ, AWQ, the few-row kernels, the native step", "quant"),
    ("4", "04_moe", "mixture of experts: routing, dispatch, load balance", "moe"),
    ("5", "05_speculative_decoding", "speculative decoding with chain drafters", "speculative"),
    ("6", "06_tree_attention", "tree attention: Token Recycling, Medusa", "tree"),
    ("7", "07_triton_kernels", "Triton kernels (GPU; tested on CPU in Triton's interpreter)", "kernels"),
    ("8", "08_putting_it_together", "every technique stacked, raced against llama.cpp", "stack"),
    ("9", "09_serving", "serving many users: continuous batching, an OpenAI-compatible server", "serve"),
]
BEGIN, END = "<!-- chapters: python -m minillm bench report -->", "<!-- /chapters -->"


def where(settings: dict) -> str:
    """The machine line of a run (CPU, capability, threads, torch) and its date."""
    return f"{settings.get('machine', 'machine not recorded')}, {settings.get('date', 'date not recorded')}"


def table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


# One renderer per bench: results -> (headline, markdown, plot or None). A plot is (title, ylabel, {label: value}).

def model(r):
    e = r["engines"]
    rows = [[name, x["load_s"], x["prefill_tok_s"], x["decode_tok_s"], x["peak_rss_mb"]] for name, x in e.items()]
    head = None
    if "hf" in e and "minillm" in e:
        head = (f"prefill {e['minillm']['prefill_tok_s'] / e['hf']['prefill_tok_s']:.2f}x, decode "
                f"{e['minillm']['decode_tok_s'] / e['hf']['decode_tok_s']:.2f}x HF transformers (float32)")
    return head, table(["engine", "load s", "prefill tok/s", "decode tok/s", "peak RSS MB"], rows), None


def tokenizer(r):
    mb = r["encode_mb_s"]
    rows = [[name, v] for name, v in mb.items()]
    head = (f"training {r['train_ratio']:.1f}x HF tokenizers' time; encoding {mb['minillm']:.1f} MB/s, "
            f"{mb['minillm -> tiktoken']:.1f} exported to tiktoken")
    text = (f"Training: minillm {r['train_s']['minillm']:.2f} s, HF tokenizers {r['train_s']['hf_tokenizers']:.2f} s.\n\n"
            + table(["encoder", "MB/s"], rows) + "\n\nOne chunk with no split point (seconds):\n\n"
            + table(["KB", "heap BPE", "reference loop", "tiktoken"],
                    [[kb, v.get("heap"), v.get("reference"), v.get("tiktoken")] for kb, v in r["long_chunk_s"].items()]))
    return head, text, None


def kv(r):
    speed = r["speed"]
    longest = max(speed, key=lambda s: s["context"])
    head = f"a KV cache decodes {longest['speedup']:.0f}x faster at {longest['context']} tokens of context"
    text = table(["context", "no cache tok/s", "cache tok/s", "speedup"],
                 [[s["context"], s["no_cache_tok_s"], s["cache_tok_s"], s["speedup"]] for s in speed])
    text += "\n\n" + table(["cache", "decode tok/s"], [[k, v] for k, v in r["by_cache"].items()])
    if "quality" in r:
        text += "\n\n" + table(["cache", "KV bytes", "perplexity", "top-1 agreement", "greedy tokens equal"],
                               [[k, v["bytes"], v["ppl"], v["top1"], v["greedy"]] for k, v in r["quality"].items()])
    return head, text, None


def quant(r):
    rows, base = r["rows"], r["rows"][0]
    backends = sorted({b for x in rows for b in (x.get("decode_tok_s") or {})},  # the three backends first
                      key=lambda b: ((("eager", "compiled", "native") + (b,)).index(b), b))
    fp32 = base["decode_tok_s"]["eager"]
    body = [[x["label"], x["model_bytes"] / 1e6, x["perplexity"], x["perplexity_code"]]
            + [(x.get("decode_tok_s") or {}).get(b) for b in backends] for x in rows]
    best = max(((x["label"], b, v) for x in rows for b, v in (x.get("decode_tok_s") or {}).items()), key=lambda t: t[2])
    head = f"{best[0]} ({best[1]}) decodes {best[2] / fp32:.2f}x float32 eager"
    text = ("Perplexity on held-out prose / code; decode tok/s on each backend.\n\n"
            + table(["weights", "MB", "ppl prose", "ppl code"] + [f"{b} tok/s" for b in backends], body))
    plot = ("decode speed vs float32 eager", "x float32 eager",
            {x["label"]: max((x.get("decode_tok_s") or {0: 0}).values()) / fp32 for x in rows if x.get("decode_tok_s")})
    return head, text, plot


def moe(r):
    rows = r["rows"]
    variants = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    best = max(rows, key=lambda x: x["sorted_grouped_mm_vs_loop"])
    head = (f"sorted grouped dispatch {best['sorted_grouped_mm_vs_loop']:.2f}x a loop over experts at "
            f"{best['experts']} experts x {best['tokens']} tokens")
    return head, table(["tokens", "experts"] + [f"{v} ms" for v in variants],
                       [[x["tokens"], x["experts"]] + [x[f"{v}_ms"] for v in variants] for x in rows]), None


def speculative(r):
    rows, n = r["rows"], r["settings"].get("prompts_per_set")
    lossless = [x for x in rows if "plain" not in x["method"] and "tree" not in x["method"] and x["same"] == n]
    best = max(lossless or rows, key=lambda x: x["speedup"])
    name = {"ngram": "prompt lookup"}.get(best["method"], best["method"])
    head = (f"best chain drafter: {name} {best['speedup']:.2f}x plain greedy ({best['set']}, {best['tpf']:.2f} tokens per forward, "
            f"tokens equal on {best['same']}/{n})")
    text = table(["prompts", "method", "tokens / forward", "speedup", f"tokens equal (of {n})"],
                 [[x["set"], x["method"], x["tpf"], x["speedup"], x["same"]] for x in rows])
    plot = ("speedup vs plain greedy, " + best["set"], "x plain", {x["method"]: x["speedup"] for x in rows
                                                                  if x["set"] == best["set"]})
    return head, text, plot


def tree(r):
    rows = r["rows"]
    n = r["settings"].get("prompts")
    trees = {k: v for k, v in rows.items() if k.startswith("tree")}
    name, best = max((trees or rows).items(), key=lambda kv: kv[1]["speedup"])
    head = f"{name.removeprefix('tree: ')} {best['speedup']:.2f}x plain greedy at {best['tokens_per_forward']:.2f} tokens per forward"
    text = table(["method", "tokens / forward", "speedup", f"tokens equal (of {n})"],
                 [[k, v["tokens_per_forward"], v["speedup"], v["same_as_plain"]] for k, v in rows.items()])
    return head, text, None


def stack(r):
    rows, peer = r["rows"], r.get("llama_cpp") or {}
    sets = [s for s in ("grounded", "open-ended") if s in rows[0]]
    body = [[x["label"], x["model_bytes"] / 1e6, x.get("perplexity")] + [x[s]["decode_tok_s"] for s in sets]
            + [x[sets[0]].get("agree_with_float32")] for x in rows]
    plot_rows = {x["label"]: x[sets[0]]["decode_tok_s"] for x in rows}
    head = None
    best = max(rows, key=lambda x: x[sets[0]]["decode_tok_s"])
    if peer.get("available"):
        body.append([f"llama.cpp {peer.get('version', '')}", None, None] + [peer[s]["decode_tok_s"] for s in sets]
                    + [peer[sets[0]].get("agree_with_float32")])
        plot_rows["llama.cpp"] = peer[sets[0]]["decode_tok_s"]
        head = (f"{best['label'].lstrip('+ ')}: {best[sets[0]]['decode_tok_s']:.0f} tok/s decode, "
                f"{best[sets[0]]['decode_tok_s'] / peer[sets[0]]['decode_tok_s']:.2f}x llama.cpp on the same GGUF")
    text = table(["step", "MB", "perplexity"] + [f"{s} decode tok/s" for s in sets] + ["tokens equal float32's"], body)
    return head, text, (f"decode tok/s, {sets[0]} prompts", "tok/s", plot_rows)


def serve(r):
    rows = r["rows"]
    head = (f"continuous batching {r['continuous_vs_serial']:.2f}x one request at a time, "
            f"p99 TPOT {r['tpot_p99_vs_single']:.2f}x a lone request's")
    text = table(["server", "mode", "rate (req/s)", "tok/s", "TTFT p50 s", "TPOT p99 ms"],
                 [[x["server"], x["mode"], x["rate"], x["tok_s"], x["ttft_p50"],
                   None if x["tpot_p99"] is None else x["tpot_p99"] * 1e3] for x in rows])
    burst = {f"{x['server']}: {x['mode']}": x["tok_s"] for x in rows if x["rate"] == "burst"}
    return head, text, ("throughput, all requests at once", "tok/s", burst)


RENDERERS = dict(model=model, tokenizer=tokenizer, kv=kv, quant=quant, moe=moe, speculative=speculative, tree=tree,
                 stack=stack, serve=serve)


def bench_of(path: Path) -> str:
    return path.name.split("_results")[0]


def runs(data_dir: Path) -> list[tuple[str, Path]]:
    """(machine, file) for every results file: "" for data/ itself, then each data/runs/<machine>/."""
    found = [("", p) for p in sorted(data_dir.glob("*_results.json"))]
    for machine in sorted(p for p in (data_dir / "runs").glob("*") if p.is_dir()):
        found += [(machine.name, p) for p in sorted(machine.glob("*_results*.json"))]
    return [(m, p) for m, p in found if bench_of(p) in RENDERERS]


def render(data_dir: Path):
    """docs/RESULTS.md's text, its plots ({png name: (title, ylabel, {label: value})}) and each bench's headline
    from data/ itself."""
    parts = ["# Measured results", "",
             "Rendered by `python -m minillm bench report` from the results files in `data/` (the course machine's "
             "runs, one per bench) and `data/runs/<machine>/` (other machines'). Do not edit by hand: re-run a bench, "
             "then the report. Every figure is a ratio against a baseline measured in the same run.", ""]
    plots, headlines = {}, {}
    for machine, path in runs(data_dir):
        result = json.loads(path.read_text())
        bench = bench_of(path)
        try:
            head, text, plot = RENDERERS[bench](result)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise ValueError(f"{path}: not a {bench} results file this report can read ({type(e).__name__}: {e})") from e
        rel = path.relative_to(data_dir.parent)
        parts += [f"## {bench}" + (f" ({machine})" if machine else ""), "",
                  f"`{rel}`: {where(result.get('settings', {}))}.", ""]
        if head:
            parts += [f"**{head}.**", ""]
        parts += [text, ""]
        if plot:
            name = str(rel.with_suffix(".png")).replace("/", "_").removeprefix("data_")
            plots[name] = plot
            parts += [f"![{plot[0]}]({name})", ""]
        if not machine:
            headlines[bench] = (head, result.get("settings", {}))
    return "\n".join(parts), plots, headlines


def chapter_table(headlines: dict, kernels_measured: bool) -> str:
    rows = []
    for number, notebook, what, bench in CHAPTERS:
        head, settings = headlines.get(bench, (None, {}))
        if bench == "kernels":
            cell = "GPU figures in `kernels/BENCHMARKS.md`" if kernels_measured else "GPU only: not measured yet"
        elif head:
            cell = f"{head} ({settings.get('cpu') or str(settings.get('cpu_capability')) + ' CPU'}, {settings.get('date')})"
        else:
            cell = f"no results file yet (`python -m minillm bench {bench}`)"
        rows.append(f"| {number} | [`{notebook}`](notebooks/{notebook}.ipynb) | {what} | {cell} |")
    return "\n".join([BEGIN, "| # | notebook | what it teaches | measured headline |", "| --- | --- | --- | --- |",
                      *rows, END])


def draw(plot, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, ylabel, values = plot
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(values) + 1.2))
    ax.barh(list(values)[::-1], list(values.values())[::-1], color="#4477aa")
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def write_report(root: Path = Path("."), log=print) -> int:
    """docs/RESULTS.md + PNGs, and the README's chapter table between its markers, from data/ under root."""
    data_dir, docs = root / "data", root / "docs"
    if not data_dir.is_dir():
        raise ValueError(f"bench report reads {data_dir}/: not found (run from the repository's root)")
    text, plots, headlines = render(data_dir)
    docs.mkdir(exist_ok=True)
    (docs / "RESULTS.md").write_text(text)
    for name, plot in plots.items():
        draw(plot, docs / name)
    readme = root / "README.md"
    kernels_measured = "No GPU measurements" not in (root / "kernels" / "BENCHMARKS.md").read_text()
    block = chapter_table(headlines, kernels_measured)
    old = readme.read_text()
    if BEGIN not in old or END not in old:
        raise ValueError(f"{readme}: no {BEGIN} ... {END} block to fill")
    readme.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S))
    log(f"wrote {docs / 'RESULTS.md'}, {len(plots)} plots, and {readme}'s chapter table")
    return 0
