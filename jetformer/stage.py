"""The one runner behind every `pipelines/*.py` DVC stage script.

    sys.exit(run_stage("judge", run_judge, __doc__, out="models/judge.pt",
                       metrics="metrics/judge.json"))

parses `--params` (plus `--preset`/`--set` with `overlays=True`, a positional argument per
`positional` entry, and one `--path-arg` per keyword default), loads the config FIRST so bad
params fail before any compute, then calls `fn(cfg, **args)`. Bad input (ConfigError,
FileNotFoundError, ValueError, StageError or the given `errors`) becomes one line
`<stage> failed: ...` on stderr and exit status 1; Ctrl-C exits 130 and SIGTERM 143 (never
success to DVC).

Metrics files (`write_metrics`) hold flat scalars only, so `dvc exp show` / `dvc metrics diff`
show one column per metric: nested dicts are flattened (`a_b`), lists (details, not metrics)
are left to the stage's plots and reports.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from jetformer.config import ConfigError, load_config
from jetformer.safe_io import atomic_write_json


class StageError(Exception):
    """A stage cannot produce its outputs (the message says why and what to run)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (preemption, `timeout`, `kill`): unwinds like Ctrl-C, so `finally` blocks and
    interrupt handlers run (a training marks its MLflow run KILLED)."""


_SIGTERM_RECEIVED = threading.Event()


def sigterm_received() -> bool:
    """Whether a `sigterm_raises` block of this process got SIGTERM (libraries such as Ray
    may turn the `Terminated` into a plain KeyboardInterrupt on its way up)."""
    return _SIGTERM_RECEIVED.is_set()


@contextlib.contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises `Terminated` in the main thread (once; a second
    SIGTERM during clean-up kills as usual). No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _SIGTERM_RECEIVED.set()
        raise Terminated(f"signal {signum}")
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """Scalars of `metrics` with nested dicts flattened to `outer_inner` keys; lists dropped;
    non-finite floats -> None."""
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, key + "_"))
        elif isinstance(v, (list, tuple)):
            continue
        elif isinstance(v, float) and not math.isfinite(v):
            out[key] = None
        else:
            out[key] = v
    return out


def write_metrics(path: str | Path, metrics: dict) -> dict:
    """Write `flat_metrics(metrics)` as JSON atomically; returns what was written."""
    flat = flat_metrics(metrics)
    atomic_write_json(path, flat, indent=1, ensure_ascii=False, sort_keys=True)
    return flat


def run_stage(name: str, fn: Callable, doc: str | None = None, *, argv=None, overlays: bool = False,
              positional: dict[str, tuple] | None = None, errors: tuple = (), **paths) -> int:
    """Exit status of `fn(cfg, **args)` run as stage `name` (`name` may use the positional
    arguments, e.g. "finetune {task}")."""
    ap = argparse.ArgumentParser(description=doc)
    for arg, choices in (positional or {}).items():
        ap.add_argument(arg, choices=choices)
    ap.add_argument("--params", default="params.yaml")
    if overlays:
        ap.add_argument("--preset", action="append", default=[], help="overlay name or YAML path")
        ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    for key, default in paths.items():
        ap.add_argument("--" + key.replace("_", "-"), default=default)
    args = vars(ap.parse_args(argv))
    params, presets, sets = args.pop("params"), args.pop("preset", ()), args.pop("set", ())
    label = name.format(**args)
    _SIGTERM_RECEIVED.clear()
    try:
        with sigterm_raises():
            cfg = load_config(params, presets, sets)    # invalid params stop here, before compute
            fn(cfg, **args)
    except (ConfigError, FileNotFoundError, ValueError, StageError, *errors) as e:
        print(f"{label} failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):             # never report success to DVC
        if sigterm_received():
            print(f"{label}: terminated (SIGTERM)", file=sys.stderr)
            return 143
        return 130                                      # Ctrl-C
    return 0
