"""KV caches: keep each layer's keys and values so that decoding a token does not recompute the prefix.

The interface the model calls (see `Transformer.forward`):
    cache.length                      tokens stored so far (the same for every sequence of the batch)
    cache.begin(positions) -> (B, S)  reserve slots for T new tokens; return positions of all keys in view
    cache.update(layer, k, v)         write this layer's new k, v (B, nkv, T, hd); return all in view (B, nkv, S, hd)
    cache.truncate(length)            roll back to the first `length` entries (speculative decoding)

StaticCache is a gpt-fast style preallocated buffer: no reallocation while decoding.
"""
from __future__ import annotations

import torch


class StaticCache:
    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_len > config.max_seq_len:
            raise ValueError(f"cache of {max_len} tokens exceeds the model's context of {config.max_seq_len}")
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # RoPE position of each slot
        self.max_len = max_len
        self.length = 0
        self._new = 0  # tokens reserved by the forward in progress

    def begin(self, positions):
        """Reserve slots [length, length + T) for the tokens about to be written."""
        T = positions.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: holds {self.length} of {self.max_len} tokens, "
                             f"cannot add {T} more")
        self.positions[:, self.length:self.length + T] = positions
        self._new = T
        self.length += T
        return self.positions[:, :self.length]

    def update(self, layer: int, k, v):
        start = self.length - self._new
        self.k[layer, :, :, start:self.length] = k
        self.v[layer, :, :, start:self.length] = v
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]

    def truncate(self, length: int):
        """Forget everything after the first `length` entries."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def nbytes(self) -> int:
        return self.k.element_size() * (self.k.numel() + self.v.numel())

    def keep(self, start: int, slots):
        """Tree attention's compaction (chapter 6): of the entries written after `start`, keep `slots`
        (increasing, each in [start, length)), moved to slots start, start + 1, ...; drop the rest."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.positions.device)
        if not 0 <= start <= self.length or (len(slots) and (slots[0] < start or slots[-1] >= self.length)) \
                or (slots.diff() <= 0).any():
            raise ValueError(f"keep expects increasing slots in [{start}, {self.length}), got {slots.tolist()}")
        n = len(slots)
        for buf in (self.k, self.v, getattr(self, "k_scale", None), getattr(self, "v_scale", None)):
            if buf is not None:  # (layers, B, nkv, S, ...); the gather copies before the write
                buf[:, :, :, start:start + n] = buf[:, :, :, slots]
        self.positions[:, start:start + n] = self.positions[:, slots]
        self.length = start + n
