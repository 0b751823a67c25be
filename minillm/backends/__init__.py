"""How a model's steps run, chosen per model on the machine at hand (chapters 3, 7 and 8).

- `choice.py`: the three backends (eager = the reference, compiled, native) and `choose(model, "auto")`, which
  measures the ones ready in seconds and says in one line what it picked;
- `autotune.py`: the one place such measurements are remembered between runs (per CPU, PyTorch and minillm).

The steps themselves are compiled.py (torch.compile) and native_step.py (one C++ call per step, on csrc/).
"""
from .choice import BACKENDS, Choice, choose, unavailable

__all__ = ["BACKENDS", "Choice", "choose", "unavailable"]
