"""Where the keys and values of past tokens live (chapter 2; paged blocks in chapter 9).

- `kv_cache.py`: the preallocated `StaticCache` (gpt-fast's `update(input_pos, k, v)`), its quantized twin and
  the bytes-per-token arithmetic;
- `kv_compress.py`: caches that keep fewer tokens (attention sinks + a window, heavy hitters) and how close their
  tokens stay to the full cache's;
- `paged.py`: a pool of fixed-size blocks and per-sequence block tables, the layout serving uses.
"""
from .kv_cache import QuantizedCache, StaticCache, kv_bytes_per_token

__all__ = ["QuantizedCache", "StaticCache", "kv_bytes_per_token"]
