"""Triton kernels for minillm, one per file in the order of the Triton tutorials.

    vector_add -> softmax -> matmul -> rmsnorm -> rope -> flash_attention -> int4_matvec

Each file holds: what you will learn, the @triton.jit kernel, a launcher that checks its inputs,
a plain-torch reference and a GPU benchmark. `python -m kernels.bench` runs the benchmarks.

Without a CUDA GPU the kernels still run, slowly, under Triton's interpreter: every program of
the grid is executed one after another in numpy. That is how the tests and the notebook check
them on a CPU. The interpreter must be chosen *before* triton is imported (triton.language's own
helpers, tl.sum and friends, are decorated at that import), so importing this package first
decides for everything: if no CUDA device is present and the user has not set TRITON_INTERPRET,
it sets TRITON_INTERPRET=1. If something imported triton earlier without the interpreter (torch
does, e.g. when a model is built on the meta device), the kernels cannot run here and
`triton_unavailable_reason()` says so: import `kernels` first, or set TRITON_INTERPRET=1 before
starting Python (the test suite's conftest.py does). Importing this package changes no other module.
"""
from __future__ import annotations

import os
import sys

import torch


def _choose_interpreter() -> bool:
    """Set TRITON_INTERPRET=1 if there is no GPU and the user chose nothing. Returns False when triton
    was already imported without the interpreter on a machine that needs it (too late to choose)."""
    if "TRITON_INTERPRET" in os.environ or torch.cuda.is_available():
        return True
    if "triton.language" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


_CHOSE_IN_TIME = _choose_interpreter()


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason() -> str | None:
    """None if the kernels can run here; otherwise one sentence saying why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # macOS, Windows, or a minimal install
        return f"Triton is not installed or cannot be imported ({e}); Triton runs on Linux x86_64 only"
    if not _CHOSE_IN_TIME:
        return ("triton was imported before `kernels` without the interpreter and there is no CUDA GPU; "
                "import kernels first, or set TRITON_INTERPRET=1 before starting Python")
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU and TRITON_INTERPRET is not 1; set TRITON_INTERPRET=1 before importing kernels"
    return None


def kernel_device() -> torch.device:
    """Where tensors for the kernels live: CPU under the interpreter, else the CUDA GPU."""
    return torch.device("cpu" if interpreting() else "cuda")


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, contiguous: bool = True) -> None:
    """Raise a ValueError naming `name` if t is not a tensor of the expected rank/dtype/layout/device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    expected = kernel_device()
    if t.device.type != expected.type:
        hint = "" if interpreting() else "; set TRITON_INTERPRET=1 to run on CPU"
        raise ValueError(f"{name} must be on {expected.type}, got {t.device.type}{hint}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_no_interpreted_bf16(name: str, t: torch.Tensor) -> None:
    """Triton 3.9's interpreter stores bfloat16 as uint16 and does arithmetic on the raw bits.

    Kernels that convert to float32 first are fine; kernels that feed bfloat16 to tl.dot are not,
    so they refuse it here (bfloat16 is tested on a GPU, in tests marked `gpu`).
    """
    if interpreting() and t.dtype == torch.bfloat16:
        raise ValueError(f"{name} is bfloat16, which Triton's CPU interpreter cannot compute with "
                         "(it stores bfloat16 as raw uint16); use float32/float16 here or run on a GPU")


def require_gpu(what: str) -> None:
    """Benchmarks time real GPU kernels; interpreter timings measure numpy, not the kernel."""
    if interpreting() or not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU (interpreter timings would measure numpy, not the kernel)")
