"""The two byte-level BPE helpers both the tokenizer and the trainer need (minbpe keeps them in base.py).

    merge             replace every occurrence of one pair of ids by a new id
    bytes_to_unicode  GPT-2's printable spelling of the 256 bytes, used in vocabulary files

Nothing here knows about patterns, special tokens or training: tokenizer.py and bpe.py build on it.
"""
from __future__ import annotations

import functools


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of bytes, used in vocab files: 0x20 (space) -> 'Ġ', 0x0A -> 'Ċ'.

    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 and up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right: [1, 2, 3, 1, 2], (1, 2), 9 -> [9, 3, 9]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
