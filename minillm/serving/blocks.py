"""The serving engine's KV memory: one PagedCache pool, prefix caching by block hash, and a packed step.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's block manager): a *full* block of a
prompt is named by a hash of its tokens and of the hash of the block before it, so equal hashes
mean equal prefixes up to that block's end, hence equal keys and values. The cache keeps a table
hash -> block and holds one reference on each block it lists, so a block outlives the request
that computed it. A new request walks its prompt's full blocks; every hash found is a block it
shares (refcount + 1) instead of computing it. When the pool runs out, blocks that only the table
holds are evicted, least recently used first.

    block_hashes([1, 2, 3, 4, 5], block_size=2) -> [h(1, 2), h(h(1, 2); 3, 4)]  (5 is in no full block)

A packed step (PackedStep) runs the tokens of several sequences as one row of the model's forward:
sequence a's n_a tokens, then b's, ... (vLLM's "varlen" batch). No padding is computed; a mask lets
each query see its own sequence's keys up to its position. It speaks the model's cache protocol
(begin, update), writing into and gathering from the pool's blocks.
Not handled: a fused paged-attention kernel (the step gathers the keys of its sequences per layer).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from ..cache.paged import PagedCache


def block_hashes(tokens, block_size: int) -> list[bytes]:
    """The chained hash of each full block of `tokens` (a partly filled last block has none)."""
    hashes, parent = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.sha256(parent)
        digest.update(array("q", tokens[start:start + block_size]).tobytes())
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class BlockManager:
    """Owns the PagedCache: sequences for requests, prefix sharing by hash, eviction when full."""

    def __init__(self, config, num_blocks: int, block_size: int = 16, dtype=torch.float32, device="cpu",
                 prefix_caching: bool = True):
        self.cache = PagedCache(config, num_blocks, block_size, dtype=dtype, device=device)
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.cached: OrderedDict[bytes, int] = OrderedDict()   # hash -> block, least recently used first
        self.hit_tokens = self.query_tokens = 0                  # prompt tokens found / looked up

    @property
    def allocator(self):
        return self.cache.allocator

    def evictable(self) -> int:
        """Blocks held by the prefix table alone: free to take back."""
        return sum(1 for b in self.cached.values() if self.allocator.refcount[b] == 1)

    def available(self) -> int:
        return len(self.allocator.free) + self.evictable()

    def make_room(self, blocks: int) -> None:
        """Evict least recently used cached blocks until `blocks` are on the free list."""
        for h in list(self.cached):
            if len(self.allocator.free) >= blocks:
                break
            if self.allocator.refcount[self.cached[h]] == 1:
                self.allocator.release(self.cached.pop(h))

    def _lookup(self, tokens) -> list[int]:
        """The cached blocks that start `tokens` (no side effects)."""
        found = []
        if self.prefix_caching:
            for h in block_hashes(tokens, self.block_size):
                if h not in self.cached:
                    break
                found.append(self.cached[h])
        return found

    def admission_cost(self, tokens: list[int], n: int) -> int:
        """How many available blocks opening `tokens` and computing n of its tokens takes (the cached
        blocks it shares stop being evictable, so they count too)."""
        found = self._lookup(tokens)
        start = min(len(found) * self.block_size, len(tokens) - 1)
        kept = -(-start // self.block_size)                      # cached blocks it keeps
        end = start + min(n, len(tokens) - start)
        new = -(-end // self.block_size) - kept + (1 if start % self.block_size else 0)  # + a copy on write
        return new + sum(self.allocator.refcount[b] == 1 for b in found[:kept])

    def open(self, tokens: list[int]) -> tuple[int, int]:
        """A sequence for a request whose sequence is `tokens`: (handle, tokens already in the cache).
        At least the last token is left to compute, since its logits choose the next token."""
        handle = self.cache.add_sequence()
        if not self.prefix_caching:
            return handle, 0
        r, found = self.cache.row(handle), 0
        self.query_tokens += len(tokens)
        for h in block_hashes(tokens, self.block_size):
            if h not in self.cached:
                break
            self.cached.move_to_end(h)
            self.allocator.share(self.cached[h])
            self.cache.block_tables[r].append(self.cached[h])
            found += self.block_size
        self.cache.lengths[r] = found
        found = min(found, len(tokens) - 1)  # a fully cached prompt recomputes its last token
        self.cache._truncate_row(r, found)   # (its block stays shared: the write copies it first)
        self.hit_tokens += found
        return handle, found

    def blocks_needed(self, handle: int, n: int) -> int:
        """Blocks that appending n tokens to `handle` takes (a copy on write included)."""
        r = self.cache.row(handle)
        counts = [n if s == r else 0 for s in range(len(self.cache.lengths))]
        return self.cache._blocks_needed(counts)

    def register(self, handle: int, tokens: list[int]) -> None:
        """List the full blocks of `handle` (whose first tokens are `tokens`) in the prefix table."""
        if not self.prefix_caching:
            return
        r = self.cache.row(handle)
        full = min(self.cache.lengths[r], len(tokens)) // self.block_size
        for h, block in zip(block_hashes(tokens[:full * self.block_size], self.block_size),
                            self.cache.block_tables[r]):
            if h not in self.cached:
                self.allocator.share(block)
                self.cached[h] = block

    def close(self, handle: int) -> None:
        self.cache.free_sequence(handle)


class PackedStep:
    """One forward over n_i new tokens of each of several sequences, packed in one row (1, sum n_i).

    Speaks the model's cache protocol: begin(positions) -> key positions (1, S); update(layer, k, v)
    stores the new keys and values in their blocks and returns every key and value of the step's
    sequences, (1, nkv, S, hd). `mask` (1, 1, N, S): a query sees keys of its own sequence, up to itself.
    """

    def __init__(self, cache: PagedCache, handles: list[int], counts: list[int]):
        device = cache.slot_positions.device
        writes, gathers, positions, query_seq, key_seq = [], [], [], [], []
        for i, (handle, n) in enumerate(zip(handles, counts)):
            r = cache.row(handle)
            start = cache.lengths[r]
            writes.append(cache._append_row(r, n))                   # copy on write, new blocks
            gathers.append(cache._rows(r, 0, start + n))
            positions.append(torch.arange(start, start + n))
            query_seq.append(torch.full((n,), i))
            key_seq.append(torch.full((start + n,), i))
        self.cache = cache
        self._write_rows = torch.cat(writes)                          # (N,)
        self._gather = torch.cat(gathers)                             # (S,)
        self.positions = torch.cat(positions)[None].to(device)        # (1, N)
        cache.slot_positions[self._write_rows] = self.positions[0]
        key_positions = cache.slot_positions[self._gather]            # (S,)
        same = torch.cat(query_seq)[:, None] == torch.cat(key_seq)[None, :]
        self.mask = (same.to(device) & (key_positions[None, :] <= self.positions[0][:, None]))[None, None]
        self.ends = torch.tensor(counts).cumsum(0) - 1                # index of each sequence's last token

    @property
    def length(self) -> int:
        return 0  # positions are always given

    def begin(self, positions):
        return self.cache.slot_positions[self._gather][None]         # (1, S)

    def update(self, layer: int, k, v):
        self.cache.k[layer, self._write_rows] = k[0].transpose(0, 1)  # (N, nkv, hd)
        self.cache.v[layer, self._write_rows] = v[0].transpose(0, 1)
        return (self.cache.k[layer, self._gather].transpose(0, 1)[None],   # (1, nkv, S, hd)
                self.cache.v[layer, self._gather].transpose(0, 1)[None])


@torch.inference_mode()
def packed_forward(model, cache: PagedCache, handles: list[int], chunks: list[list[int]]) -> torch.Tensor:
    """Run each sequence's next tokens (chunks[i] continues handles[i]) in one forward -> the logits
    after each chunk's last token, (len(handles), vocab)."""
    step = PackedStep(cache, handles, [len(c) for c in chunks])
    ids = torch.tensor([t for c in chunks for t in c], device=cache.slot_positions.device)[None]  # (1, N)
    logits = model(ids, step.positions, step.mask, step, logits_at=step.ends.to(ids.device))
    return logits[0]                                                  # (len(handles), vocab)

