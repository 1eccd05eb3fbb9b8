"""The one runner behind every `pipelines/*.py` DVC stage script.

    sys.exit(run_stage("judge", run_judge, __doc__, out="models/judge.pt", metrics="metrics/judge.json"))

parses `--params` (plus `--preset`/`--set` with `overlays=True`, a positional argument per
`positional` entry, and one `--path-arg` per keyword default), loads the config FIRST so bad
params fail before any compute, then calls `fn(cfg, **args)`. Bad input (ConfigError,
FileNotFoundError, ValueError, StageError or the given `errors`) becomes one line
`<stage> failed: ...` on stderr and exit status 1; Ctrl-C exits 130 (never success to DVC).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from jetformer.config import ConfigError, load_config


class StageError(Exception):
    """A stage cannot produce its outputs (the message says why and what to run)."""


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
    try:
        cfg = load_config(params, presets, sets)        # invalid params stop here, before compute
        fn(cfg, **args)
    except (ConfigError, FileNotFoundError, ValueError, StageError, *errors) as e:
        print(f"{label} failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):             # Ctrl-C: never report success to DVC
        return 130
    return 0
