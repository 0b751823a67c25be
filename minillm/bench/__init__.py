"""The benchmarks behind `python -m minillm bench WHAT`, one module per chapter, at the top of the
package: they import the techniques and the decoding loop, nothing imports them (but the CLI).

    model        minillm vs HF transformers: prefill, decode, peak memory (chapter 0)
    tokenizer    BPE training and encoding vs HF tokenizers and tiktoken (chapter 1)
    kv           decode with / without a cache, memory per token, compression quality (chapter 2)
    quant        perplexity, bytes and decode speed per quantization (chapter 3)
    moe          dense vs sorted vs loop expert dispatch (chapter 4)
    speculative  every chain drafter vs plain decoding (chapter 5)
    tree         chains vs trees vs plain decoding, and the cost of a tree's size (chapter 6)
    stack        every technique stacked, raced against llama.cpp (chapter 8)
    serve        many users over HTTP: one at a time, static and continuous batching, llama.cpp (chapter 9)
    report       renders every results file into docs/RESULTS.md and the README's chapter table
    timing       what they share: median timing, decode tok/s through the loop, bandwidth, the machine line

Every figure is a ratio against a baseline measured in the same run; none is a timed unit test. From the
repository's root each bench writes data/<bench>_results.json (elsewhere: --out, or nothing).
"""
