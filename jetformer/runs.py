"""Plumbing shared by training, sweeps, ablations and `compare`: starting Ray, and the CSV /
markdown tables they write. (Files are written by `jetformer.safe_io`; MLflow tag names live in
`jetformer.train.tracking`.)
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import warnings

LOCAL_OBJECT_STORE = 256 * 1024 ** 2     # bytes; trials and workers pass configs, not tensors


# ----------------------------------------------------------------------------- Ray
def _quiet_ray_env(local: bool) -> None:
    """Environment read by Ray at import/init: no print patching, deduplicated worker logs;
    a local Ray also runs without auth and preemption watcher (a cluster's own are kept)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


def init_ray(address: str = "") -> bool:
    """Connect to `address` (else $RAY_ADDRESS), or start a quiet local Ray (no dashboard, a
    small object store). Returns True when this call started it (and so must shut it down)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    _quiet_ray_env(local=not address)
    import ray
    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE, **common)
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    return True


# ----------------------------------------------------------------------------- tables
def _finite(v) -> bool:
    return not (v is None or (isinstance(v, float) and not math.isfinite(v)))


def csv_text(header: list[str], rows: list[list]) -> str:
    """CSV with `header`: floats exact (`repr`), None and NaN/inf as empty cells."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([("" if not _finite(v) else repr(v) if isinstance(v, float) else v)
                    for v in row])
    return buf.getvalue()


def dict_rows(rows: list[dict], keys: list[str] | None = None) -> tuple[list[str], list[list]]:
    """(header, value lists) of dict rows; the header is `keys` or the union of the rows'
    keys, first row's order first."""
    keys = list(keys) if keys is not None else list(dict.fromkeys(k for r in rows for k in r))
    return keys, [[r.get(k) for k in keys] for r in rows]


def md_cell(v) -> str:
    """A markdown table cell: floats to 4 significant digits, None and NaN/inf empty."""
    if not _finite(v):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table, every cell through `md_cell`."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows])
