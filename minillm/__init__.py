"""minillm: how modern LLM inference is made efficient, one readable module per technique.

    import minillm
    model, tok = minillm.load_pretrained("smollm2-135m")
    out = minillm.generate(model, torch.tensor([tok.encode("The capital of France is")]), max_new_tokens=32)
    text = minillm.generate(model, "The capital of France is", 32, tokenizer=tok)   # prompt + completion
    minillm.save_quantized(minillm.quantize(model, "int4"), "smollm2-int4.safetensors")   # load_quantized(path)
"""
from .compiled import compile_decode
from .decoding import decode, generate, stream, stream_text
from .kv_cache import StaticCache
from .loading import ModelFileError, gguf_path, load_pretrained
from .model import Config, Transformer, smollm2_135m, tiny
from .perplexity import perplexity
from .quant import load_quantized, quantize, save_quantized
from .sampling import sample_next

__all__ = ["Config", "Transformer", "tiny", "smollm2_135m", "load_pretrained", "gguf_path", "ModelFileError",
           "generate", "stream", "stream_text", "decode", "sample_next", "StaticCache",
           "quantize", "save_quantized", "load_quantized", "perplexity", "compile_decode"]
