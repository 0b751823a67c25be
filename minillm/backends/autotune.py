"""Measure once, remember: the choices minillm makes by timing the machine at hand, kept between runs.

    value, cached = remembered("backend/bfloat16, int4 g64 + int8 head", lambda: {"backend": "native", ...})

The file is `$MINILLM_CACHE/choices.json` (default `$XDG_CACHE_HOME/minillm`, else `~/.cache/minillm`), one
entry per machine key: the CPU's model name and feature flags, the PyTorch and minillm versions. Another CPU, a
new PyTorch or a new minillm measures again; nothing measured on one machine decides for another. Written to a
temporary name and renamed, so two processes measuring at once leave one whole file. An unreadable or foreign
file is measured over, never trusted.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..timing import _proc_cpuinfo, cpu_info


def _version() -> str:
    try:
        return importlib.metadata.version("minillm")
    except importlib.metadata.PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown"


def cache_file() -> Path:
    root = os.environ.get("MINILLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minillm"
    return Path(root) / "choices.json"


def machine_key() -> str:
    """The CPU model, a hash of its feature flags, PyTorch's and minillm's versions: what a measurement depends on."""
    name, _ = cpu_info()
    flags = next((line for line in (_proc_cpuinfo() or "").splitlines() if line.startswith(("flags", "Features"))), "")
    return f"{name} | flags {hashlib.sha256(flags.encode()).hexdigest()[:12]} | torch {torch.__version__} | minillm {_version()}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def entries() -> dict:
    """Everything remembered for this machine: {key: value}."""
    entry = _read(cache_file()).get(machine_key())
    return entry if isinstance(entry, dict) else {}


def recall(key: str):
    """What was measured for `key` on this machine, or None."""
    entry = _read(cache_file()).get(machine_key())
    return entry.get(key) if isinstance(entry, dict) else None


def remember(key: str, value) -> None:
    """Store `value` (JSON) for `key` on this machine; a cache directory that cannot be written is skipped quietly
    (the choice is then measured again next time, nothing else changes)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        entry = data.get(machine_key())
        data[machine_key()] = dict(entry if isinstance(entry, dict) else {}, **{key: value})
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        pass


def remembered(key: str, measure: Callable[[], object]) -> tuple[object, bool]:
    """(value, cached): the value stored for `key` on this machine, or measure() stored and returned."""
    value = recall(key)
    if value is not None:
        return value, True
    value = measure()
    remember(key, value)
    return value, False
