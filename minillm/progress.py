"""One progress bar for every long step (model conversion, calibration, benchmarks).

It draws on stderr for a person at a terminal and stays silent where stderr is not one: a notebook,
a test, a pipe or a log file, whose output must stay what it was. tqdm's `disable=None` is that rule.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it", show: bool | None = None,
             **kwargs):
    """tqdm over `iterable` on stderr, gone once finished. show: None (default) draws it only where stderr
    is a terminal; True always (a command asked for it); False never."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if show is None else not show, **kwargs)
