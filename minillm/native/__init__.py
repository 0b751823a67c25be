"""Hand-written C++ kernels for the CPU (chapters 3 and 6), at the bottom of the package: the quantized
formats (quant/formats.py), decoding (sampling, drafters, trees) and the backends call them; they call nothing above.

- `build.py`: compiling `csrc/` with this machine's compiler at first use, cached per CPU and sources;
- `attention.py`, `logits.py`, `gemv.py`: attention over a static cache, the argmax/top-k of logits, and the
  few-row matrix-vector kernels (with their AMX tile variant), each beside the PyTorch reference it must equal.

Each says whether it can run here (`available()`); the backends decide whether it does (minillm.backends).
"""
