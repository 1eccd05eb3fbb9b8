"""MLflow tracking (DESIGN §6): one named run per training, params flat, per-step metrics,
git commit and `dvc.lock` hash tags, artifacts.

The tracking URI is `mlflow.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a SQLite file in
the project (`sqlite:///<root>/mlflow.db`, artifacts under `<root>/mlruns`): no server needed.
`<root>` is the nearest directory above the working directory holding `dvc.yaml` (DVC runs
stages there), else the working directory. Everything goes through an explicit
`MlflowClient` and run id, so the driver can log from a background thread.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

RUN_FILE = "mlflow_run.json"       # beside the exported checkpoint: evaluation logs into this run


def project_root(start: str | Path | None = None) -> Path:
    start = Path(start or os.getcwd()).resolve()
    for d in (start, *start.parents):
        if (d / "dvc.yaml").is_file():
            return d
    return start


def tracking_uri(cfg) -> str:
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def _quiet_mlflow() -> None:
    # alembic migrations on a fresh SQLite file log a page of INFO lines
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


_CLIENTS: dict = {}


def client(cfg):
    """An `MlflowClient` on the configured tracking URI (one per URI and process)."""
    uri = tracking_uri(cfg)
    if uri not in _CLIENTS:
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def experiment_id(cl, cfg) -> str:
    """The experiment `mlflow.experiment`, created on first use with an explicit artifact
    location (a relative `./mlruns` would depend on the creating process' cwd)."""
    exp = cl.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri(cfg).startswith("sqlite:///"):
        db = Path(tracking_uri(cfg)[len("sqlite:///"):])
        artifact_location = (db.parent / "mlruns").resolve().as_uri()
    try:
        return cl.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_location)
    except Exception:  # created meanwhile by another process
        exp = cl.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(root: Path | None = None) -> str:
    """`<sha>` of HEAD, with `-dirty` when tracked files differ; "" outside a git checkout."""
    root = root or project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("-dirty" if dirty else "")


def file_hash(path: Path) -> str:
    """sha1 of a file's bytes, "" when it does not exist."""
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else ""


def run_tags(cfg, config_hash: str) -> dict[str, str]:
    root = project_root()
    return {"git_commit": git_commit(root), "dvc_lock_sha1": file_hash(root / "dvc.lock"),
            "config_hash": config_hash, "task": cfg.train.task,
            "data_source": cfg.data.source, "factoring": cfg.model.factoring}


def start_run(cfg, run_name: str, config_hash: str, run_id: str | None = None) -> str:
    """Create the run (params flat, tags) — or reopen `run_id` when it still exists, so a
    resumed training keeps logging into its own run. Returns the run id."""
    from mlflow.entities import Param, RunTag
    cl = client(cfg)
    if run_id:
        try:
            run = cl.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                cl.update_run(run_id, status="RUNNING")
                return run_id
        except Exception:
            pass  # deleted or another tracking store: start a new run
    exp = experiment_id(cl, cfg)
    tags = run_tags(cfg, config_hash)
    run = cl.create_run(exp, run_name=run_name, tags=tags)
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
              for k, v in sorted(cfg.flat().items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        cl.log_batch(run.info.run_id, params=params[i:i + 100])
    cl.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return run.info.run_id


def log_metrics(cfg, run_id: str, metrics: dict, step: int) -> None:
    """Finite numeric entries of `metrics` at `step`."""
    import math
    import time

    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if batch:
        client(cfg).log_batch(run_id, metrics=batch)


def log_artifact(cfg, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    cl = client(cfg)
    if path.is_dir():
        cl.log_artifacts(run_id, str(path), artifact_path)
    else:
        cl.log_artifact(run_id, str(path), artifact_path)


def end_run(cfg, run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(run_id, status=status)


def run_info(cfg, run_id: str) -> dict:
    """What evaluation needs to log into the training's run (written next to the checkpoint)."""
    cl = client(cfg)
    run = cl.get_run(run_id)
    return {"tracking_uri": tracking_uri(cfg), "experiment_id": run.info.experiment_id,
            "experiment": cfg.mlflow.experiment, "run_id": run_id, "run_name": run.info.run_name}
