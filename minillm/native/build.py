"""Building and loading the hand-written C++ kernels of minillm/native/csrc (attention.py, logits.py,
gemv.py) with this machine's own compiler, at first use.

    lib = build_library("rows.cpp")                   # a ctypes.CDLL; RuntimeError saying why if it cannot
    lib = build_library("attention.cpp", {"HD": 64})  # -DHD=64
    lib = load("rows.cpp", setup=declare)             # once per process: the library, or the same error again
    load("gemv.cpp", with_torch=True)                 # built against PyTorch: loading registers its ops


`g++ -O3 -march=native -fopenmp -shared -fPIC` (or $CXX, else clang++; with_torch adds PyTorch's headers,
libraries and ABI: torch_flags), one library per source and set of defines, cached under $MINILLM_KERNEL_CACHE
(default ~/.cache/minillm/kernels) by a hash of the sources (the .cpp and the headers of csrc/), the compiler
and its version, the flags, PyTorch's version and this CPU's feature flags, so a machine never loads a library
built for another CPU and an edited source is rebuilt. Built to a temporary
name and renamed, so two processes building at once do no harm. No compiler, or a failed build: RuntimeError
with the reason in one line (the callers keep PyTorch's code then).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_LOADED: dict = {}    # (source, defines) -> the loaded, set-up library, or the reason it could not be had


def cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_KERNEL_CACHE") or Path.home() / ".cache" / "minillm" / "kernels")


def find_compiler() -> str | None:
    """The C++ compiler's path ($CXX, else g++, else clang++), or None; inductor needs one too (backends/compiled.py)."""
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """This CPU's feature flags (what -march=native builds for): part of the library's cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def torch_flags() -> list:
    """What a source that registers ops with PyTorch's dispatcher (`#include <torch/library.h>`) is built with:
    this PyTorch's headers, its libraries (found again at load through an rpath) and its C++ ABI."""
    root = Path(torch.__file__).parent
    return [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", "-std=c++20",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-L{root / 'lib'}",
            f"-Wl,-rpath,{root / 'lib'}", "-ltorch_cpu", "-lc10"]


def build_library(source: str, defines: dict | None = None, with_torch: bool = False) -> ctypes.CDLL:
    """Compile csrc/`source` with `defines` ({name: value} -> -Dname=value) once, cache it, load it.
    with_torch: build against PyTorch (torch_flags); loading the library then registers its ops."""
    cxx = find_compiler()
    what = Path(source).stem
    if cxx is None:
        raise RuntimeError(f"no C++ compiler found ($CXX, g++ or clang++) to build the {what} kernel")
    flags = FLAGS + [f"-D{name}={value}" for name, value in sorted((defines or {}).items())]
    flags += torch_flags() if with_torch else []
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    texts = [(CSRC / source).read_text()] + [h.read_text() for h in sorted(CSRC.glob("*.h"))]
    key = hashlib.sha256("\n".join(texts + [cxx, version, " ".join(flags), platform.machine(), torch.__version__,
                                            torch.backends.cpu.get_cpu_capability(), _cpu_flags()]).encode())
    tag = "".join(f"_{name.lower()}{value}" for name, value in sorted((defines or {}).items()))
    path = cache_dir() / f"{what}{tag}_{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        libs = [f for f in flags if f.startswith(("-L", "-l", "-Wl,"))]    # after the source, or they go unused
        done = subprocess.run([cxx, *[f for f in flags if f not in libs], str(CSRC / source), *libs, "-o", str(tmp)],
                              capture_output=True, text=True)
        if done.returncode:
            tmp.unlink(missing_ok=True)
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
            raise RuntimeError(f"building the {what} kernel failed: {first}")
        os.replace(tmp, path)           # atomic: a concurrent build of the same key is harmless
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeError(f"loading the {what} kernel failed: {e}") from None


def load(source: str, defines: dict | None = None, setup=None, with_torch: bool = False) -> ctypes.CDLL:
    """build_library once per process, then `setup(lib)` (argtypes, checks; may raise RuntimeError): the
    library is remembered, and so is the reason it could not be built, which is raised again on each call
    without trying the compiler again."""
    key = (source, tuple(sorted((defines or {}).items())))
    if key not in _LOADED:
        try:
            lib = build_library(source, defines, with_torch)
            if setup is not None:
                setup(lib)
            _LOADED[key] = lib
        except RuntimeError as e:
            _LOADED[key] = str(e)
    lib = _LOADED[key]
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib
