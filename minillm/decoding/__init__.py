"""The decoding loop and what it proposes, verifies and samples (chapters 0, 2, 5 and 6).

- `loop.py`: the one loop, gpt-fast and vLLM style (propose -> verify in one forward -> accept -> roll the cache
  back); `generate`, `decode`, `stream`, and the caches and drafters it builds from their names;
- `sampling.py`: temperature, top-k, top-p; `speculative.py`: the accept rule and its expected speed-up;
- `drafters.py`: chains to verify (n-gram / prompt lookup, a draft model, layer skip, early exit);
- `tree.py`: trees of drafts verified in one forward (a tree mask, Token Recycling); `medusa.py`: Medusa heads.
"""
from .loop import (
                   CACHES,
                   DISTILLED_DRAFT,
                   TREES,
                   DecodeResult,
                   SpecResult,
                   check_draft_spec,
                   check_stop,
                   decode,
                   decode_steps,
                   generate,
                   make_cache,
                   make_drafter,
                   rollback,
                   speculative_generate,
                   stream,
                   stream_text,
                   visible_text,
)

__all__ = ["CACHES", "DISTILLED_DRAFT", "TREES", "DecodeResult", "SpecResult", "check_draft_spec", "check_stop",
           "decode", "decode_steps", "generate", "make_cache", "make_drafter", "rollback", "speculative_generate",
           "stream", "stream_text", "visible_text"]
