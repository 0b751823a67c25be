"""KV caches: keep each layer's keys and values so that decoding a token does not recompute the prefix.

The interface the model calls (see `Transformer.forward`):
    cache.length                      tokens stored so far (the same for every sequence of the batch)
    cache.begin(positions) -> (B, S)  reserve slots for T new tokens; return positions of all keys in view
    cache.update(layer, k, v)         write this layer's new k, v (B, nkv, T, hd); return all in view (B, nkv, S, hd)
    cache.truncate(length)            roll back to the first `length` entries (speculative decoding)

Three caches here, each adding one idea to the last:
    ConcatCache     torch.cat the new keys onto the old: the simplest, reallocates every step
    StaticCache     a gpt-fast style preallocated buffer: no reallocation while decoding
    QuantizedCache  the static buffer stored as int8 with one scale per (token, head): ~4x smaller than float32
The paged cache (block tables, prefix sharing) is in paged.py; eviction (StreamingLLM, H2O) in kv_compress.py.

Every cache raises ValueError on overflow: a cache that silently wrapped around or dropped tokens
would give plausible but wrong text.
"""
from __future__ import annotations

import torch


def kv_bytes_per_token(config, bytes_per_value: float = 4) -> float:
    """Cache bytes one token costs: 2 (k and v) x layers x kv heads x head dim x bytes per value.

    SmolLM2-135M in float32: 2 x 30 x 3 x 64 x 4 = 46,080 bytes; with one KV head per query head
    (no grouped-query attention) it would be 3x that, 138,240.
    """
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_value


def _check_room(length: int, new: int, capacity: int):
    if length + new > capacity:
        raise ValueError(f"KV cache overflow: holds {length} of {capacity} tokens, cannot add {new} more")


class ConcatCache:
    """The simplest cache: a list of (k, v) per layer, grown with torch.cat. Every step copies the
    whole cache (O(S) memory traffic per token even before attention); StaticCache avoids that."""

    def __init__(self, config, max_len: int | None = None):
        self.k = [None] * config.n_layers
        self.v = [None] * config.n_layers
        self.positions = None  # (B, S)
        self.max_len = max_len or config.max_seq_len
        self.length = 0

    def begin(self, positions):
        _check_room(self.length, positions.shape[1], self.max_len)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        self.length = self.positions.shape[1]
        return self.positions

    def update(self, layer: int, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)  # (B, nkv, S, hd)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def truncate(self, length: int):
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.positions = self.positions[:, :length] if self.positions is not None else None
        self.k = [None if k is None else k[:, :, :length] for k in self.k]
        self.v = [None if v is None else v[:, :, :length] for v in self.v]
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class StaticCache:
    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_len > config.max_seq_len:
            raise ValueError(f"cache of {max_len} tokens exceeds the model's context of {config.max_seq_len}")
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self._alloc(shape, dtype, device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # RoPE position of each slot
        self.max_len = max_len
        self.length = 0
        self._new = 0  # tokens reserved by the forward in progress

    def _alloc(self, shape, dtype, device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def begin(self, positions):
        """Reserve slots [length, length + T) for the tokens about to be written."""
        T = positions.shape[1]
        _check_room(self.length, T, self.max_len)
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

    @torch.inference_mode()  # caches filled under inference mode can only be edited under it
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


def quantize_int8(x):
    """Symmetric absmax int8 over the last dim: x (..., hd) -> (int8 (..., hd), scale (..., 1)).

    One scale per (token, head) vector, so an outlier token does not cost the others precision.
    Example: [0.5, -1.0, 0.25] -> scale 1/127, codes [64, -127, 32] (round(0.5 * 127) = 64).
    """
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127
    codes = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes, scale, dtype=torch.float32):
    return (codes.float() * scale).to(dtype)


class QuantizedCache(StaticCache):
    """StaticCache stored as int8 codes plus a float32 scale per (layer, sequence, head, token).

    Bytes per token per head: head_dim + 4 (68 for SmolLM2) instead of 4 x head_dim (256) in float32.
    The model still computes in `dtype`: each update dequantizes the cache in view (simple, not fast;
    a fused kernel would dequantize inside attention). The newest tokens are quantized too, so what a
    query sees is exactly what later queries will see.
    """

    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.dtype = dtype
        super().__init__(config, batch_size, max_len, dtype, device)

    def _alloc(self, shape, dtype, device):
        self.k = torch.zeros(shape, dtype=torch.int8, device=device)
        self.v = torch.zeros(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(shape[:-1] + (1,), dtype=torch.float32, device=device)
        self.v_scale = torch.zeros(shape[:-1] + (1,), dtype=torch.float32, device=device)

    def update(self, layer: int, k, v):
        start, end = self.length - self._new, self.length
        self.k[layer, :, :, start:end], self.k_scale[layer, :, :, start:end] = quantize_int8(k)
        self.v[layer, :, :, start:end], self.v_scale[layer, :, :, start:end] = quantize_int8(v)
        return (dequantize_int8(self.k[layer, :, :, :end], self.k_scale[layer, :, :, :end], self.dtype),
                dequantize_int8(self.v[layer, :, :, :end], self.v_scale[layer, :, :, :end], self.dtype))

    def nbytes(self) -> int:
        return super().nbytes() + 4 * (self.k_scale.numel() + self.v_scale.numel())
