"""Evaluation outputs: atomic JSON/CSV writers, the merged `metrics/eval.json`, and logging to
the MLflow run of the trained model (its id is stored next to the checkpoint)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from pathlib import Path

# every key issue 5 asks for in metrics/eval.json (value null when it does not apply to the model/data)
REQUIRED_KEYS = ("fid", "precision", "recall", "kid", "t2i_attribute_accuracy",
                 "class_attribute_accuracy", "cider", "vqa_accuracy", "zeroshot_accuracy",
                 "val_bits_per_dim", "val_uncond_bits_per_dim", "png_bits_per_dim",
                 "judge_val_accuracy")


def _atomic_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _clean(obj):
    """JSON-safe: non-finite floats -> null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    _atomic_text(path, json.dumps(_clean(obj), indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run its DVC stage first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def write_csv(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Rows of dicts -> CSV with the union of keys as header (first row's order first);
    `fields` first when given (so an empty file still has the columns its DVC plot reads)."""
    fields = list(fields or [])
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields or ["index"])
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    _atomic_text(path, buf.getvalue())


def merge_results(parts: dict[str, dict]) -> dict:
    """One flat dict from the per-stage metric files {stage: metrics}; every REQUIRED_KEY
    present (null when no stage produced it). A key produced twice must agree."""
    out: dict = {}
    for stage, metrics in parts.items():
        for k, v in metrics.items():
            if isinstance(v, (dict, list)):
                continue                         # details stay in the per-stage files
            if k in out and out[k] != v:
                raise ValueError(f"metric {k!r} differs between stages: {out[k]!r} vs {v!r} ({stage})")
            out[k] = v
    for k in REQUIRED_KEYS:
        out.setdefault(k, None)
    return out


# the quality bar: the model must beat the trivial baselines ({metric: (baseline, direction)})
BASELINE_CHECKS = {
    "t2i_attribute_accuracy": ("baseline_t2i_attribute_accuracy", ">"),
    "class_attribute_accuracy": ("baseline_class_attribute_accuracy", ">"),
    "cider": ("baseline_cider", ">"),
    "vqa_accuracy": ("baseline_vqa_accuracy", ">"),
    "zeroshot_accuracy": ("baseline_zeroshot_accuracy", ">"),
    "val_bits_per_dim": ("png_bits_per_dim", "<"),
    "val_uncond_bits_per_dim": ("png_bits_per_dim", "<"),
}


def beats_baselines(merged: dict) -> dict[str, bool]:
    """{metric: whether the model beats its trivial baseline} for the metrics both are known for."""
    beats = {}
    for k, (b, op) in BASELINE_CHECKS.items():
        v, ref = merged.get(k), merged.get(b)
        if v is not None and ref is not None:
            beats[k] = bool(v > ref) if op == ">" else bool(v < ref)
    return beats


def training_run(cfg) -> dict | None:
    """The MLflow run file written next to the exported checkpoint, or None."""
    from jetformer.train.tracking import RUN_FILE

    path = Path(cfg.train.out_dir) / RUN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def log_to_training_run(cfg, metrics: dict, artifacts: list[tuple[str, str]], step: int = 0,
                        log=print) -> str | None:
    """Log numeric `metrics` (prefixed `eval/`) and `artifacts` [(path, artifact_dir)] to the
    training's MLflow run. Returns the run id, or None when there is no run to log into."""
    from jetformer.train import tracking

    run = training_run(cfg)
    if run is None:
        log(f"MLflow: no run file in {cfg.train.out_dir}; evaluation results not logged")
        return None
    run_id = run["run_id"]
    # log where the training logged (its tracking URI), whatever this process' environment says
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=run["tracking_uri"]))
    tracking.log_metrics(cfg, run_id, {f"eval/{k}": v for k, v in metrics.items()}, step)
    for path, artifact_dir in artifacts:
        if Path(path).exists():
            tracking.log_artifact(cfg, run_id, path, artifact_dir)
    return run_id
