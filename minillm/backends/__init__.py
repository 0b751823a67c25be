"""How a model's steps run, chosen per model on the machine at hand (chapters 3, 6 and 8).

- `choice.py`: the three backends (eager = the reference, compiled, native) and `choose(model, "auto")`, which
  measures the ones ready in seconds and says in one line what it picked;
- `autotune.py`: the one place such measurements are remembered between runs (per CPU, PyTorch and minillm).

- `compiled.py`: the torch.compile step, with `prepack.py` (oneDNN's weight layout, once) and `fuse.py` (q/k/v
  and gate/up as one matmul each); `native_step.py`: every block of a step in one C++ call (native/csrc/step.cpp);
- `stack.py`: loading the weights a user asked for onto the step chosen here, and chapter 8's race.
"""
from .choice import BACKENDS, Choice, choose, unavailable

__all__ = ["BACKENDS", "Choice", "choose", "unavailable"]
