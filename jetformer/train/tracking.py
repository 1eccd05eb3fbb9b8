"""MLflow tracking: one named run per training, one nested run per evaluation,
params flat, per-step metrics, standard source tags and the DVC experiment, artifacts.

Where things live:
  * `store_root()`: the repository whose `mlflow.db`, `mlruns/` and Ray run dirs these are:
    `$DVC_ROOT` (DVC sets it for every stage; for `dvc exp run --temp/--queue` it is the
    parent repository, not the temporary copy, so runs outlive the copy), else
    `project_root()`.
  * `project_root()`: the working copy a stage runs in (nearest `dvc.yaml` above the cwd):
    stage inputs and outputs resolve against it.
The tracking URI is `mlflow.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else
`sqlite:///<store_root>/mlflow.db` (artifacts under `<store_root>/mlruns`): no server needed.
Everything goes through an explicit `MlflowClient` and run id, so the driver can log from a
background thread.

Tags every run gets (constants below; `compare.py` selects runs by them): the role (train,
eval, sweep, trial, ablation), the DVC experiment name and baseline revision (`$DVC_EXP_NAME`,
`$DVC_EXP_BASELINE_REV`, set by `dvc exp run`), MLflow's `mlflow.source.git.commit` /
`mlflow.source.name` / `mlflow.source.type`, and the config hash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

# ----------------------------------------------------------------------------- tag names
TAG_ROLE = "jetformer.role"                 # one of the ROLE_* values
ROLE_TRAIN, ROLE_EVAL, ROLE_SWEEP, ROLE_TRIAL, ROLE_ABLATION = (
    "train", "eval", "sweep", "trial", "ablation")
TAG_DVC_EXP = "dvc.exp_name"                # `dvc exp run` experiment ("" outside one)
TAG_DVC_BASELINE = "dvc.baseline_rev"       # the git commit the experiment is based on
TAG_SWEEP = "jetformer.sweep"               # sweep name, on a sweep's parent and trial runs
TAG_ABLATION_TABLE = "jetformer.ablation_table"   # ablation table name, on its rows' runs
TAG_ABLATION = "jetformer.ablation"         # an ablation point's row (`jetformer.ablate.ROWS`)
TAG_SEED = "jetformer.seed"                 # an ablation point's seed
TAG_TRIAL = "ray.trial_id"                  # a sweep trial's Ray Tune trial id
TAG_TRAINING_RUN = "jetformer.training_run_id"    # on an evaluation run: the run it evaluates
TAG_PARENT = "mlflow.parentRunId"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"


def project_root(start: str | Path | None = None) -> Path:
    """The working copy: nearest directory at or above `start` (default cwd) with dvc.yaml."""
    start = Path(start or os.getcwd()).resolve()
    for d in (start, *start.parents):
        if (d / "dvc.yaml").is_file():
            return d
    return start


def store_root() -> Path:
    """The repository that owns the tracking store and Ray storage: `$DVC_ROOT`, else
    `project_root()`."""
    root = os.environ.get("DVC_ROOT", "")
    return Path(root).resolve() if root else project_root()


def tracking_uri(cfg) -> str:
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{store_root() / 'mlflow.db'}"


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


def dvc_experiment() -> tuple[str, str]:
    """(experiment name, baseline revision) of the running `dvc exp run`, ("", "") outside."""
    return os.environ.get("DVC_EXP_NAME", ""), os.environ.get("DVC_EXP_BASELINE_REV", "")


def run_tags(cfg, config_hash: str, role: str = "") -> dict[str, str]:
    """The tags of a run started by this process (see the module docstring); the role tag
    only when `role` is given (callers that set their own role put theirs first)."""
    root = project_root()
    commit = git_commit(root)
    exp, baseline = dvc_experiment()
    stage = os.environ.get("DVC_STAGE", "")
    source = f"dvc:{stage}" if stage else Path(sys.argv[0]).name or "python"
    tags = {TAG_ROLE: role, TAG_DVC_EXP: exp, TAG_DVC_BASELINE: baseline,
            TAG_GIT_COMMIT: commit.removesuffix("-dirty"), TAG_SOURCE_NAME: source,
            TAG_SOURCE_TYPE: "LOCAL", "git_commit": commit,
            "dvc_lock_sha1": file_hash(root / "dvc.lock"), "config_hash": config_hash,
            "task": cfg.train.task, "data_source": cfg.data.source,
            "factoring": cfg.model.factoring}
    optional = (TAG_ROLE, TAG_DVC_EXP, TAG_DVC_BASELINE, TAG_GIT_COMMIT)   # left out when ""
    return {k: v for k, v in tags.items() if v or k not in optional}


def _log_params(cl, run_id: str, cfg) -> None:
    from mlflow.entities import Param
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
              for k, v in sorted(cfg.flat().items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        cl.log_batch(run_id, params=params[i:i + 100])


def start_run(cfg, run_name: str, config_hash: str, run_id: str | None = None,
              extra_tags: dict[str, str] | None = None) -> str:
    """Create the training run (params flat, tags) — or reopen `run_id` when it still exists,
    so a resumed training keeps logging into its own run. Returns the run id."""
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
    tags = {**run_tags(cfg, config_hash, role=ROLE_TRAIN), **(extra_tags or {})}
    run = cl.create_run(exp, run_name=run_name, tags=tags)
    _log_params(cl, run.info.run_id, cfg)
    return run.info.run_id


def start_eval_run(cfg, training_run_id: str | None, run_name: str = "") -> str:
    """A new evaluation run nested under `training_run_id` (when that run is in this store),
    tagged with the DVC experiment: each evaluation has its own run, so two experiments that
    share a training never overwrite each other's results. Returns its id."""
    cl = client(cfg)
    exp_id = experiment_id(cl, cfg)
    tags = run_tags(cfg, cfg.hash(), role=ROLE_EVAL)
    if training_run_id:
        from mlflow.exceptions import MlflowException
        tags[TAG_TRAINING_RUN] = training_run_id
        try:
            if cl.get_run(training_run_id).info.experiment_id == exp_id:
                tags[TAG_PARENT] = training_run_id
        except MlflowException:  # a training tracked elsewhere: keep its id, no parent link
            pass
    name = run_name or "eval-" + (dvc_experiment()[0] or "workspace")
    run = cl.create_run(exp_id, run_name=name, tags=tags)
    _log_params(cl, run.info.run_id, cfg)
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


def metric_steps(cfg, run_id: str, key: str) -> set[int]:
    """The steps at which `key` is already logged in the run (a resumed training skips them)."""
    return {m.step for m in client(cfg).get_metric_history(run_id, key)}


def log_artifact(cfg, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    cl = client(cfg)
    if path.is_dir():
        cl.log_artifacts(run_id, str(path), artifact_path)
    else:
        cl.log_artifact(run_id, str(path), artifact_path)


def end_run(cfg, run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(run_id, status=status)
