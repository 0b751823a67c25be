"""minillm: how modern LLM inference is made efficient, one readable module per technique.

    import minillm
    model, tok = minillm.load_pretrained("smollm2-135m")
    out = minillm.generate(model, torch.tensor([tok.encode("The capital of France is")]), max_new_tokens=32)
    text = minillm.generate(model, "The capital of France is", 32, tokenizer=tok)   # prompt + completion
    minillm.save_quantized(minillm.quantize(model, "int4"), "smollm2-int4.safetensors")   # load_quantized(path)
"""
from .backends.compiled import compile_decode
from .cache.kv_cache import StaticCache
from .decoding.loop import decode, generate, stream, stream_text
from .decoding.sampling import sample_next
from .model.llama import Config, Transformer, smollm2_135m, tiny
from .model.loading import ModelFileError, gguf_path, load_pretrained
from .model.perplexity import perplexity
from .quant import load_quantized, quantize, save_quantized

__all__ = ["Config", "Transformer", "tiny", "smollm2_135m", "load_pretrained", "gguf_path", "ModelFileError",
           "generate", "stream", "stream_text", "decode", "sample_next", "StaticCache",
           "quantize", "save_quantized", "load_quantized", "perplexity", "compile_decode"]
