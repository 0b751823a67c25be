"""Chapter 1: text to token ids and back.

- `bpe_base.py`, `bpe.py`, `bpe_mixture.py`: byte-level BPE built up one idea a file (minbpe style): the pair
  counting and merging, a trainable tokenizer with a split regex, and a heuristic mixture corpus;
- `tokenizer.py`: SmolLM2's own tokenizer (GPT-2 byte map, its merges and special tokens), read from the GGUF;
- `tokenizer_io.py`: saving and loading a trained tokenizer.
"""
from .tokenizer import Tokenizer

__all__ = ["Tokenizer"]
