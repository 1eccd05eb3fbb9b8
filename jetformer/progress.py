"""Feedback on long loops: `for x in progress(items, "sample t2i"): ...`.

On a terminal a tqdm bar with rate and ETA; otherwise (DVC logs, CI, a file) one line every
`every` of the way, `<desc>: 40% (4/10) 12s, ETA 18s`, so a log shows where a long stage is
without a carriage-return mess. Both stay silent for loops shorter than `delay` seconds and go
to stderr, beside the stage's own results on stdout.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def _clock(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _lines(iterable: Iterable, desc: str, total: int, every: float, delay: float,
           file) -> Iterator:
    start, next_mark, shown = time.monotonic(), every, False
    done = 0
    for done, item in enumerate(iterable, 1):
        yield item
        frac = done / total
        if frac + 1e-9 >= next_mark or done == total:
            while next_mark <= frac + 1e-9:
                next_mark += every
            elapsed = time.monotonic() - start
            if elapsed >= delay or shown:
                eta = elapsed / frac * (1 - frac)
                print(f"{desc}: {frac:.0%} ({done}/{total}) {_clock(elapsed)}, ETA {_clock(eta)}",
                      file=file, flush=True)
                shown = True


def progress(iterable: Iterable, desc: str, total: int | None = None, *, every: float = 0.1,
             delay: float = 1.0, file=None, tty: bool | None = None) -> Iterable:
    """`iterable`, reporting progress (see the module docstring). `total` defaults to
    `len(iterable)`; without a length only a terminal bar (no ETA) is shown."""
    file = file or sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if tty is None:
        tty = hasattr(file, "isatty") and file.isatty()
    if tty:
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, delay=delay, file=file,
                    dynamic_ncols=True, leave=False)
    if not total:
        return iterable
    return _lines(iterable, desc, total, every, delay, file)
