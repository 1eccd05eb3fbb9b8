"""Evaluation outputs: atomic JSON/CSV writers, the `metrics/eval.json` summary, and the
evaluation's own MLflow run, nested under the training run it evaluates (whose id is in
`metrics/train.json`).

Each metric is in exactly one metrics file (the stage that computes it): `metrics/eval.json`
holds only what the report adds — whether the model beats each trivial baseline, and the
evaluation's MLflow run id — so `dvc exp show` shows every column once."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from jetformer.safe_io import atomic_write_text

# every evaluation result, in the metrics file of the stage that computes it (merge_results:
# null when it does not apply to the model/data)
REQUIRED_KEYS = ("fid", "precision", "recall", "kid", "t2i_attribute_accuracy",
                 "class_attribute_accuracy", "cider", "vqa_accuracy", "zeroshot_accuracy",
                 "val_bits_per_dim", "val_uncond_bits_per_dim", "png_bits_per_dim",
                 "judge_val_accuracy")


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
    atomic_write_text(path,
                      json.dumps(_clean(obj), indent=1, ensure_ascii=False, sort_keys=True) + "\n")


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
    atomic_write_text(path, buf.getvalue())


def merge_results(parts: dict[str, dict]) -> dict:
    """One flat dict from the per-stage metric files {stage: metrics}; every REQUIRED_KEY
    present (null when no stage produced it). A key produced twice must agree."""
    out: dict = {}
    for stage, metrics in parts.items():
        for k, v in metrics.items():
            if isinstance(v, (dict, list)):
                continue                         # details stay in the per-stage files
            if k in out and out[k] != v:
                raise ValueError(f"metric {k!r} differs between stages: {out[k]!r} vs {v!r} "
                                 f"({stage})")
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


def report_metrics(merged: dict, eval_run_id: str | None) -> dict:
    """`metrics/eval.json`: `beats_<metric>` per baseline check, and the MLflow run id."""
    return {**{f"beats_{k}": v for k, v in beats_baselines(merged).items()},
            "mlflow_run_id": eval_run_id or ""}


def training_run_id(train_metrics: str | Path) -> str:
    """The MLflow run id the `train` stage wrote into its metrics file ("" when none)."""
    path = Path(train_metrics)
    return str(read_json(path).get("mlflow_run_id") or "") if path.is_file() else ""


def log_evaluation(cfg, training_run: str, metrics: dict, artifacts: list[tuple[str, str]],
                   step: int = 0) -> str:
    """A new evaluation run nested under `training_run` (`tracking.start_eval_run`): numeric
    `metrics` and `artifacts` [(path, artifact_dir)]; returns its id. The training run's own
    metrics are never touched, so experiments sharing a training do not overwrite each other."""
    from jetformer.train import tracking

    run_id = tracking.start_eval_run(cfg, training_run)
    try:
        tracking.log_metrics(cfg, run_id, metrics, step)
        for path, artifact_dir in artifacts:
            if Path(path).exists():
                tracking.log_artifact(cfg, run_id, path, artifact_dir)
    except BaseException:
        tracking.end_run(cfg, run_id, "FAILED")
        raise
    tracking.end_run(cfg, run_id)
    return run_id
