"""Tokenizers in and out: tiktoken Encodings both ways, and a small human-readable file.

tiktoken stores no merge list, only `mergeable_ranks` (token bytes -> rank, which is also the id),
and encodes by repeatedly joining the adjacent pair whose *concatenation* has the lowest rank.
`recover_merges` turns that back into an ordered merge list (each token is the join of the two
pieces that tiktoken's own algorithm, stopped just before the token's rank, leaves), so that
minillm.tokenization.tokenizer's pair-based encoder gives the same ids (tested on cl100k_base).

File format (`save`/`load`), one merge per line in GPT-2's byte spelling, as HF's merges.txt:

    #minillm-bpe v1
    #pattern "'(?i:[sdmt]|ll|ve|re)|..."         (JSON string)
    #special "<|endoftext|>" 4096
    Ġ t
    h e
    ...
Only tokenizers laid out as `train` makes them (ids 0..255 = bytes, merge k = id 256 + k) are saved.
"""
from __future__ import annotations

import json

from .bpe_base import bytes_to_unicode

FORMAT_LINE = "#minillm-bpe v1"


def _tiktoken_pieces(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token`, using only ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def recover_merges(ranks: dict[bytes, int]) -> tuple[dict[int, bytes], dict[tuple[int, int], int]]:
    """tiktoken's mergeable_ranks -> (vocab id -> bytes, merges {(left, right): id} in rank order)."""
    merges = {}
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        pieces = _tiktoken_pieces(token, ranks, max_rank=rank)
        if len(pieces) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens")
        merges[ranks[pieces[0]], ranks[pieces[1]]] = rank
    return {rank: token for token, rank in ranks.items()}, merges


def from_tiktoken(encoding) -> tuple:
    """A tiktoken Encoding's (vocab, merges, pattern, special tokens): what Tokenizer(...) takes."""
    # tiktoken keeps these private; they are the inputs `tiktoken.Encoding(...)` was built from.
    vocab, merges = recover_merges(encoding._mergeable_ranks)
    return vocab, merges, encoding._pat_str, dict(encoding._special_tokens)


def to_tiktoken(tok, name: str = "minillm"):
    """A tiktoken Encoding that encodes like `tok` (ids as ranks: merges must come in id order)."""
    import tiktoken

    if list(tok.merges.values()) != sorted(tok.merges.values()):
        raise ValueError("tiktoken uses ids as merge priorities, but this tokenizer's merges are not in id order")
    ranks = {token: i for i, token in tok.vocab.items()}
    return tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)


def _check_trained_layout(tok):
    bytes_first = all(tok.vocab.get(i) == bytes([i]) for i in range(256))
    if not bytes_first or list(tok.merges.values()) != list(range(256, 256 + len(tok.merges))):
        raise ValueError("save() writes tokenizers laid out as train() makes them: ids 0..255 the bytes, "
                         "merge k = id 256 + k; this one is not (e.g. cl100k or SmolLM2)")


def save(tok, path):
    _check_trained_layout(tok)
    spell = bytes_to_unicode()
    lines = [FORMAT_LINE, "#pattern " + json.dumps(tok.pattern)]
    lines += [f"#special {json.dumps(s)} {i}" for s, i in tok.special_tokens.items()]
    for left, right in tok.merges:
        lines.append(" ".join("".join(spell[b] for b in tok.vocab[i]) for i in (left, right)))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def load(path) -> tuple:
    """(vocab, merges, pattern, special tokens) read from a file save() wrote: what Tokenizer(...) takes."""
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or lines[0] != FORMAT_LINE:
        raise ValueError(f"{path}: expected first line {FORMAT_LINE!r}, got {lines[:1]}")
    pattern, special, merges = None, {}, {}
    vocab = {i: bytes([i]) for i in range(256)}
    ids = {token: i for i, token in vocab.items()}
    for n, line in enumerate(lines[1:], start=2):
        if line.startswith("#pattern "):
            pattern = json.loads(line[len("#pattern "):])
        elif line.startswith("#special "):
            name, i = line[len("#special "):].rsplit(" ", 1)
            special[json.loads(name)] = int(i)
        else:
            left, right = (bytes(byte_of[ch] for ch in part) for part in line.split(" "))
            if left not in ids or right not in ids:
                raise ValueError(f"{path}:{n}: merge {line!r} uses a token not made by an earlier line")
            new_id = 256 + len(merges)
            merges[ids[left], ids[right]] = new_id
            vocab[new_id] = left + right
            ids[left + right] = new_id
    if pattern is None:
        raise ValueError(f"{path}: no '#pattern' line")
    return vocab, merges, pattern, special
