"""A paged KV cache (the PagedAttention idea of vLLM): memory handed out in fixed-size blocks.

A contiguous cache must reserve, for every request, room for the longest it might become; a
request that stops early wastes the rest. Here the cache is one pool of `num_blocks` blocks of
`block_size` token slots. Each sequence owns a *block table*: the list of blocks holding its
tokens in order. Token j of a sequence lives in block `table[j // block_size]`, slot
`j % block_size`. A free list hands out blocks; at most block_size - 1 slots per sequence are idle.

Prefix sharing: `fork(seq)` gives a new sequence the same block table and increments each block's
reference count, so n continuations of one prompt store the prompt once. The first write into a
shared, partly filled block copies it first (copy on write), so that writes never leak across
sequences. A block returns to the free list when its count reaches zero.

Sequences in one batch may have different lengths: give each token its own position (B, T);
positions >= PAD_POSITION mark padding, which is neither stored nor visible to real queries.
Not handled: a fused kernel that attends over blocks in place. `update` gathers each sequence's
blocks into a padded (B, nkv, S, hd) tensor, which costs a copy of the cache per layer and step.
"""
from __future__ import annotations

import torch

PAD_POSITION = 2**62  # a key at this position is masked out by the causal mask of any real query


class BlockAllocator:
    """A free list and a reference count per block."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self.refcount = [0] * num_blocks

    def allocate(self) -> int:
        if not self.free:
            raise ValueError(f"paged KV cache is full: all {self.num_blocks} blocks of {self.block_size} "
                             f"tokens are in use")
        block = self.free.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int):
        if self.refcount[block] < 1:
            raise ValueError(f"block {block} is free; only a block in use can be shared")
        self.refcount[block] += 1

    def release(self, block: int):
        if self.refcount[block] < 1:
            raise ValueError(f"block {block} is already free (double release)")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free.append(block)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)


class PagedCache:
    """Keys and values of many sequences in one pool of blocks; the model sees the usual cache protocol.

    The batch is the list of sequences, in order: `add_sequence()` and `fork(seq)` append one,
    `free_sequence(seq)` removes one (later ones move down). A forward's batch row b is sequence b.
    """

    def __init__(self, config, num_blocks: int, block_size: int = 16, dtype=torch.float32, device="cpu"):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        rows = num_blocks * block_size  # block i is rows [i * block_size, (i + 1) * block_size)
        self.k = torch.zeros(config.n_layers, rows, config.n_kv_heads, config.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_positions = torch.full((rows,), PAD_POSITION, dtype=torch.long, device=device)
        self.block_tables: list[list[int]] = []
        self.lengths: list[int] = []

    # -- sequences ---------------------------------------------------------------------------
    def add_sequence(self) -> int:
        self.block_tables.append([])
        self.lengths.append(0)
        return len(self.lengths) - 1

    def fork(self, seq: int) -> int:
        """A new sequence sharing every block of `seq` (prefix sharing); returns its index."""
        for block in self.block_tables[seq]:
            self.allocator.share(block)
        self.block_tables.append(list(self.block_tables[seq]))
        self.lengths.append(self.lengths[seq])
        return len(self.lengths) - 1

    def free_sequence(self, seq: int):
        for block in self.block_tables.pop(seq):
            self.allocator.release(block)
        self.lengths.pop(seq)

    def truncate_sequence(self, seq: int, length: int):
        if not 0 <= length <= self.lengths[seq]:
            raise ValueError(f"cannot truncate sequence {seq} of {self.lengths[seq]} tokens to {length}")
        table = self.block_tables[seq]
        keep = -(-length // self.block_size)  # blocks still needed (ceil)
        for block in table[keep:]:
            self.allocator.release(block)
        del table[keep:]
        self.lengths[seq] = length

    def sequence_positions(self, seq: int) -> torch.Tensor:
        return self.slot_positions[self._rows(seq, 0, self.lengths[seq])]

    # -- slots -------------------------------------------------------------------------------
    def _rows(self, seq: int, start: int, end: int) -> torch.Tensor:
        j = torch.arange(start, end, device=self.slot_positions.device)
        table = torch.tensor(self.block_tables[seq], dtype=torch.long, device=j.device)
        return table[j // self.block_size] * self.block_size + j % self.block_size

    def _blocks_needed(self, counts) -> int:
        """Blocks the appends `counts[seq]` would take, copies on write included (exact, so that a
        batch that fits is never refused and one that does not is refused before anything changes)."""
        needed, pending = 0, {}
        for seq, n in enumerate(counts):
            length, table = self.lengths[seq], self.block_tables[seq]
            if n and length % self.block_size:  # the first write lands in the partly filled last block
                last = table[-1]
                if self.allocator.refcount[last] - pending.get(last, 0) > 1:
                    needed += 1
                    pending[last] = pending.get(last, 0) + 1
            needed += -(-(length + n) // self.block_size) - len(table)
        return needed

    def append_slots(self, seq: int, n: int) -> torch.Tensor:
        """Make room for n more tokens of `seq`; return the pool rows they go to (copy on write first)."""
        needed = self._blocks_needed([n if s == seq else 0 for s in range(len(self.lengths))])
        if needed > len(self.allocator.free):
            raise ValueError(f"KV cache overflow: the paged cache has {len(self.allocator.free)} free blocks of "
                             f"{self.block_size} tokens, sequence {seq} needs {needed} for {n} more tokens")
        length, table, bs = self.lengths[seq], self.block_tables[seq], self.block_size
        if n and length % bs and self.allocator.refcount[table[-1]] > 1:
            shared, private = table[-1], self.allocator.allocate()
            rows_from, rows_to = slice(shared * bs, (shared + 1) * bs), slice(private * bs, (private + 1) * bs)
            self.k[:, rows_to], self.v[:, rows_to] = self.k[:, rows_from], self.v[:, rows_from]
            self.slot_positions[rows_to] = self.slot_positions[rows_from]
            self.allocator.release(shared)
            table[-1] = private
        while len(table) * bs < length + n:
            table.append(self.allocator.allocate())
        self.lengths[seq] = length + n
        return self._rows(seq, length, length + n)

    # -- the protocol the model calls --------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens stored per sequence (the longest, when lengths differ: then pass positions explicitly)."""
        return max(self.lengths, default=0)

    def begin(self, positions):
        B = positions.shape[0]
        if B != len(self.lengths):
            raise ValueError(f"batch has {B} rows but the paged cache holds {len(self.lengths)} sequences")
        self._valid = positions < PAD_POSITION  # (B, T) tokens to store
        counts = self._valid.sum(1).tolist()
        needed, free = self._blocks_needed(counts), len(self.allocator.free)
        if needed > free:
            raise ValueError(f"KV cache overflow: the paged cache has {free} free blocks of {self.block_size} "
                             f"tokens, this step needs {needed}")
        rows = [self.append_slots(seq, n) for seq, n in enumerate(counts)]
        self._write_rows = torch.cat(rows)                                   # (N,) N = valid tokens
        self.slot_positions[self._write_rows] = positions[self._valid]
        S = self.length
        device = self.slot_positions.device
        table = torch.zeros(B, -(-S // self.block_size), dtype=torch.long, device=device)  # (B, blocks), 0-padded
        for seq, blocks in enumerate(self.block_tables):
            table[seq, :len(blocks)] = torch.tensor(blocks, dtype=torch.long, device=device)
        j = torch.arange(S, device=device)
        self._gather = table[:, j // self.block_size] * self.block_size + j % self.block_size  # (B, S)
        key_positions = self.slot_positions[self._gather]
        return key_positions.masked_fill(j >= torch.tensor(self.lengths, device=device)[:, None], PAD_POSITION)

    def update(self, layer: int, k, v):
        self.k[layer, self._write_rows] = k.transpose(1, 2)[self._valid]   # (N, nkv, hd)
        self.v[layer, self._write_rows] = v.transpose(1, 2)[self._valid]
        return self.k[layer, self._gather].transpose(1, 2), self.v[layer, self._gather].transpose(1, 2)

    def truncate(self, length: int):
        """Roll every sequence back to its first `length` tokens."""
        for seq in range(len(self.lengths)):
            self.truncate_sequence(seq, length)

    @torch.inference_mode()  # caches filled under inference mode can only be edited under it
    def keep(self, start: int, slots):
        """Tree compaction (chapter 6), as StaticCache.keep, for every sequence: of the entries written
        after `start`, keep `slots` (increasing, in [start, length)) at positions start, start + 1, ..."""
        slots = torch.as_tensor(slots, dtype=torch.long)
        for seq, length in enumerate(list(self.lengths)):
            if not 0 <= start <= length or (len(slots) and (slots[0] < start or slots[-1] >= length)) \
                    or (slots.diff() <= 0).any():
                raise ValueError(f"keep expects increasing slots in [{start}, {length}), got {slots.tolist()}")
            rows = self._rows(seq, 0, length)[slots.to(self.slot_positions.device)]
            k, v, positions = self.k[:, rows].clone(), self.v[:, rows].clone(), self.slot_positions[rows].clone()
            self.truncate_sequence(seq, start)
            rows = self.append_slots(seq, len(slots))        # copy on write if a block is shared
            self.k[:, rows], self.v[:, rows], self.slot_positions[rows] = k, v, positions

    def nbytes(self, used_only: bool = True) -> int:
        """Bytes of the blocks in use (or of the whole pool), keys and values."""
        per_block = 2 * self.k[:, :self.block_size].numel() * self.k.element_size()
        return per_block * (self.allocator.num_used if used_only else self.allocator.num_blocks)


@torch.inference_mode()
def generate_batch(model, prompts, max_new_tokens: int, block_size: int = 16, cache: PagedCache | None = None,
                   eos_token_id=None):
    """Greedy-decode a batch of prompts of different lengths together; returns the new ids of each.

    prompts: a list of 1-D id sequences. With `cache` given (e.g. after prefilling a shared prefix and
    forking), prompt i continues cache sequence i. Padding is by position (PAD_POSITION), so each
    row computes what it would alone. Greedy only: sampling a batch draws its random numbers
    differently from sampling each prompt alone. Stops early once every row has emitted eos_token_id.
    """
    prompts = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("give at least one prompt, each of at least one token")
    config, param = model.config, next(model.parameters())
    if cache is None:
        longest = max(len(p) for p in prompts) + max_new_tokens
        cache = PagedCache(config, len(prompts) * -(-longest // block_size), block_size, param.dtype, param.device)
        for _ in prompts:
            cache.add_sequence()
    if len(prompts) != len(cache.lengths):
        raise ValueError(f"{len(prompts)} prompts for a cache of {len(cache.lengths)} sequences")
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), PAD_POSITION, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
        positions[b, :len(p)] = torch.arange(cache.lengths[b], cache.lengths[b] + len(p))
    last = torch.tensor([len(p) - 1 for p in prompts])
    logits = model(ids.to(param.device), positions.to(param.device), cache=cache)[torch.arange(B), last]  # (B, V)
    new = []
    for step in range(max_new_tokens):
        next_ids = logits.argmax(-1)                                           # (B,)
        new.append(next_ids)
        if eos_token_id is not None and (torch.stack(new, 1) == eos_token_id).any(1).all():
            break
        if step + 1 < max_new_tokens:
            positions = torch.tensor(cache.lengths, device=param.device)[:, None]  # (B, 1)
            logits = model(next_ids[:, None], positions, cache=cache)[:, -1]
    out = torch.stack(new, 1).tolist()
    if eos_token_id is not None:
        out = [row[:row.index(eos_token_id) + 1] if eos_token_id in row else row for row in out]
    return out
