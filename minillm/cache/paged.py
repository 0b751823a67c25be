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

    def _check(self, block) -> int:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block!r} is not a block of this pool (0 to {self.num_blocks - 1})")
        return block

    def share(self, block: int):
        if self.refcount[self._check(block)] < 1:
            raise ValueError(f"block {block} is free; only a block in use can be shared")
        self.refcount[block] += 1

    def release(self, block: int):
        if self.refcount[self._check(block)] < 1:
            raise ValueError(f"block {block} is already free (double release)")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free.append(block)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)


class PagedCache:
    """Keys and values of many sequences in one pool of blocks; the model sees the usual cache protocol.

    `add_sequence()` and `fork(seq)` return a handle, an int that names that sequence until it is
    freed (handles are never reused, so a double free or a stale handle is an error, never another
    sequence). The batch is the live sequences in the order they were added: a forward's row b is
    `handles[b]`; freeing one moves the later rows up (`row(handle)` says where a sequence is).
    """

    def __init__(self, config, num_blocks: int, block_size: int = 16, dtype=torch.float32, device="cpu"):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        rows = num_blocks * block_size  # block i is rows [i * block_size, (i + 1) * block_size)
        self.k = torch.zeros(config.n_layers, rows, config.n_kv_heads, config.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_positions = torch.full((rows,), PAD_POSITION, dtype=torch.long, device=device)
        self.block_tables: list[list[int]] = []   # per row of the batch
        self.lengths: list[int] = []              # per row of the batch
        self.handles: list[int] = []              # per row of the batch: the sequence's handle
        self._next_handle = 0

    # -- sequences ---------------------------------------------------------------------------
    def row(self, seq: int) -> int:
        """The batch row of the sequence with handle `seq`."""
        if not isinstance(seq, bool) and isinstance(seq, int) and seq in self.handles:
            return self.handles.index(seq)
        raise ValueError(f"sequence {seq!r} is not in this cache (freed already, or never added); "
                         f"live sequences: {self.handles}")

    def _new_row(self, table: list[int], length: int) -> int:
        self.block_tables.append(table)
        self.lengths.append(length)
        self.handles.append(self._next_handle)
        self._next_handle += 1
        return self.handles[-1]

    def add_sequence(self) -> int:
        """A new, empty sequence at the end of the batch; returns its handle."""
        return self._new_row([], 0)

    def fork(self, seq: int) -> int:
        """A new sequence sharing every block of `seq` (prefix sharing); returns its handle."""
        r = self.row(seq)
        for block in self.block_tables[r]:
            self.allocator.share(block)
        return self._new_row(list(self.block_tables[r]), self.lengths[r])

    def free_sequence(self, seq: int):
        """Release the blocks of `seq` and remove it from the batch (later rows move up)."""
        r = self.row(seq)
        for block in self.block_tables.pop(r):
            self.allocator.release(block)
        self.lengths.pop(r)
        self.handles.pop(r)

    def truncate_sequence(self, seq: int, length: int):
        self._truncate_row(self.row(seq), length)

    def _truncate_row(self, r: int, length: int):
        if not 0 <= length <= self.lengths[r]:
            raise ValueError(f"cannot truncate sequence {self.handles[r]} of {self.lengths[r]} tokens to {length}")
        table = self.block_tables[r]
        keep = -(-length // self.block_size)  # blocks still needed (ceil)
        for block in table[keep:]:
            self.allocator.release(block)
        del table[keep:]
        self.lengths[r] = length

    def sequence_positions(self, seq: int) -> torch.Tensor:
        r = self.row(seq)
        return self.slot_positions[self._rows(r, 0, self.lengths[r])]

    # -- slots -------------------------------------------------------------------------------
    def _rows(self, r: int, start: int, end: int) -> torch.Tensor:
        """Pool rows of tokens [start, end) of batch row r."""
        j = torch.arange(start, end, device=self.slot_positions.device)
        table = torch.tensor(self.block_tables[r], dtype=torch.long, device=j.device)
        return table[j // self.block_size] * self.block_size + j % self.block_size

    def _blocks_needed(self, counts) -> int:
        """Blocks the appends `counts[row]` would take, copies on write included (exact, so that a
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
        return self._append_row(self.row(seq), n)

    def _append_row(self, r: int, n: int) -> torch.Tensor:
        needed = self._blocks_needed([n if s == r else 0 for s in range(len(self.lengths))])
        if needed > len(self.allocator.free):
            raise ValueError(f"KV cache overflow: the paged cache has {len(self.allocator.free)} free blocks of "
                             f"{self.block_size} tokens, sequence {self.handles[r]} needs {needed} for {n} more tokens")
        length, table, bs = self.lengths[r], self.block_tables[r], self.block_size
        if n and length % bs and self.allocator.refcount[table[-1]] > 1:
            shared, private = table[-1], self.allocator.allocate()
            rows_from, rows_to = slice(shared * bs, (shared + 1) * bs), slice(private * bs, (private + 1) * bs)
            self.k[:, rows_to], self.v[:, rows_to] = self.k[:, rows_from], self.v[:, rows_from]
            self.slot_positions[rows_to] = self.slot_positions[rows_from]
            self.allocator.release(shared)
            table[-1] = private
        while len(table) * bs < length + n:
            table.append(self.allocator.allocate())
        self.lengths[r] = length + n
        return self._rows(r, length, length + n)

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
        rows = [self._append_row(r, n) for r, n in enumerate(counts)]
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
        for r in range(len(self.lengths)):
            self._truncate_row(r, length)

    @torch.inference_mode()  # caches filled under inference mode can only be edited under it
    def keep(self, start: int, slots):
        """Tree compaction (chapter 6), as StaticCache.keep, for every sequence: of the entries written
        after `start`, keep `slots` (increasing, in [start, length)) at positions start, start + 1, ..."""
        slots = torch.as_tensor(slots, dtype=torch.long)
        for r, length in enumerate(list(self.lengths)):
            if not 0 <= start <= length or (len(slots) and (slots[0] < start or slots[-1] >= length)) \
                    or (slots.diff() <= 0).any():
                raise ValueError(f"keep expects increasing slots in [{start}, {length}), got {slots.tolist()}")
            rows = self._rows(r, 0, length)[slots.to(self.slot_positions.device)]
            k, v, positions = self.k[:, rows].clone(), self.v[:, rows].clone(), self.slot_positions[rows].clone()
            self._truncate_row(r, start)
            rows = self._append_row(r, len(slots))           # copy on write if a block is shared
            self.k[:, rows], self.v[:, rows], self.slot_positions[rows] = k, v, positions

    def nbytes(self, used_only: bool = True) -> int:
        """Bytes of the blocks in use (or of the whole pool), keys and values."""
        per_block = 2 * self.k[:, :self.block_size].numel() * self.k.element_size()
        return per_block * (self.allocator.num_used if used_only else self.allocator.num_blocks)
