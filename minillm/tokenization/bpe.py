"""Training a byte-level BPE vocabulary: the merge list that minillm.tokenization.tokenizer encodes with.

BPE (Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units"; byte-level
in Radford et al., "Language Models are Unsupervised Multitask Learners") starts from the 256
bytes and repeatedly adds the most frequent adjacent pair of tokens as a new token.

Two things make this fast enough for megabytes of text in pure Python:
1. Pre-split chunks repeat ("the" occurs thousands of times), so each distinct chunk is stored
   once with its count, and a pair in it counts `count` times.
2. After a merge only the chunks that contain the merged pair change, so only their pair counts
   are updated -- no rescan of the corpus per merge. `where[pair]` says which chunks to visit and
   a heap with stale entries skipped on pop gives the most frequent pair.

`train_bpe_ref` is the obviously correct version (recount everything each merge), for tests.
Ties between equally frequent pairs go to the smaller (left id, right id), as in HF tokenizers.
Not handled: min_frequency, a limit on token length, or merging across chunks.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict

import regex

from .bpe_base import merge


def get_stats(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict[tuple[int, int], int]:
    """Count adjacent pairs, each `weight` times: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def _chunks(text: str, pattern: str) -> tuple[list[list[int]], list[int]]:
    """Distinct pre-split chunks as byte lists, and how often each occurs."""
    counts = Counter(regex.findall(pattern, text))
    return [list(chunk.encode("utf-8")) for chunk in counts], list(counts.values())


def _check_size(vocab_size: int):
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the bytes), got {vocab_size}")


class ChunkPairs:
    """Pair counts over weighted chunks, kept up to date as merges are applied.

    words[w] is chunk w as token ids and weights[w] how often it occurs; counts[pair] is the
    weighted number of times `pair` is adjacent; where[pair] the chunks that (may) hold it.
    """

    def __init__(self, text: str, pattern: str):
        self.words, self.weights = _chunks(text, pattern)
        self.counts: dict[tuple[int, int], int] = defaultdict(int)
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, ids in enumerate(self.words):
            for pair in zip(ids, ids[1:]):
                self.counts[pair] += self.weights[w]
                self.where[pair].add(w)

    def apply(self, pair: tuple[int, int], new_id: int) -> set[tuple[int, int]]:
        """Merge `pair` into `new_id` in every chunk that holds it; return the pairs whose count changed."""
        changed = set()
        for w in self.where.pop(pair, ()):
            ids, weight = self.words[w], self.weights[w]
            new_ids = merge(ids, pair, new_id)
            if len(new_ids) == len(ids):
                continue  # a stale entry in `where`: an earlier merge already used this pair's ids
            for old in zip(ids, ids[1:]):  # take the chunk's pairs out, put the merged ones in
                self.counts[old] -= weight
                changed.add(old)
            for new in zip(new_ids, new_ids[1:]):
                self.counts[new] += weight
                self.where[new].add(w)
                changed.add(new)
            self.words[w] = new_ids
        for p in changed:
            if self.counts[p] <= 0:
                del self.counts[p]
        return changed


def train_bpe(text: str, vocab_size: int, pattern: str) -> dict[tuple[int, int], int]:
    """Learn `vocab_size - 256` merges from `text`: {(left id, right id): new id}, in order.

    Ids 0..255 are the bytes; merge k makes id 256 + k. Stops early if no pair is left.
    """
    _check_size(vocab_size)
    pairs = ChunkPairs(text, pattern)
    heap = [(-count, pair) for pair, count in pairs.counts.items()]  # max-heap on count, then min pair
    heapq.heapify(heap)
    merges = {}
    while len(merges) < vocab_size - 256 and heap:
        neg_count, pair = heapq.heappop(heap)
        if pairs.counts.get(pair, 0) != -neg_count:
            continue  # stale: the count changed after this entry was pushed
        merges[pair] = 256 + len(merges)
        for p in pairs.apply(pair, merges[pair]):
            if p in pairs.counts:
                heapq.heappush(heap, (-pairs.counts[p], p))
    return merges


def train_bpe_ref(text: str, vocab_size: int, pattern: str) -> dict[tuple[int, int], int]:
    """The same, recounting every pair of every chunk before each merge (slow; for tests)."""
    _check_size(vocab_size)
    words, weights = _chunks(text, pattern)
    merges = {}
    while len(merges) < vocab_size - 256:
        counts = {}
        for ids, weight in zip(words, weights):
            get_stats(ids, counts, weight)
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges[pair] = 256 + len(merges)
        words = [merge(ids, pair, merges[pair]) for ids in words]
    return merges
