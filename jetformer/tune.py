"""Ray Tune sweeps of the noise curriculum (paper §3.2, §4 "Effect of the noise curriculum").

`python -m jetformer sweep experiments/sweeps/noise.yaml [--preset P] [--set k=v] [--fresh]`

* The sweep-space file names the keys to search (any numeric or choice key of params.yaml),
  grid or random, the metric and ASHA early stopping, and fixed overrides that size the budget.
  ASHA's grace period must reach the end of every trial's noise curriculum (checked: before it
  a high-sigma0 trial is worse by construction). `seed` / `train.seed` in the space are repeats:
  the best setting is chosen by its mean over them and `best.yaml` leaves them out.
* Each trial is one process (`tune.with_resources`, `tune.cpus_per_trial` / `gpus_per_trial`,
  at most `tune.max_concurrent_trials` at once) that calls the same `train_loop` as the
  pipeline with world_size 1. At every checkpoint step the loop reports val bits/dim; the
  trial adds a cheap sample-quality proxy, `val_fid` (FID of a few hundred samples against as
  many val images, through the judge on the shapes world, Inception on real data), and passes
  both with the checkpoint to `tune.report`, so ASHA can stop poor trials early and a restored
  sweep resumes each trial from its last checkpoint.
* MLflow: one parent run per sweep (the space, the base config, the summary), one child run per
  trial created with `parent_run_id=` (params, per-step curves, val metrics). Trials stopped by
  ASHA never run code after their last report, so the driver closes their runs after `fit`.
* The Tune experiment is named by a hash of the space file and the base config: an interrupted
  sweep is restored with `Tuner.restore` when run again (`--fresh` starts over), a changed one
  never resumes an old one.
* Outputs (`experiments/results/sweeps/<name>/`): `best.yaml` (the best trial's swept values as
  an overlay for `--preset` / `dvc exp run -S`), `trials.csv`, `summary.md`.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jetformer.compare import atomic_write_text
from jetformer.config import (ConfigError, deep_merge, flatten, load_config, load_config_dict,
                              read_yaml)

PARENT_ROLE_TAG = "jetformer.role"     # "sweep" on the parent run (compare.py leaves it out)
TRIAL_TAG = "ray.trial_id"
SWEEP_TAG = "jetformer.sweep"
REPORTED_METRICS = ("val_bits_per_dim", "val_fid", "val_text_nll")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = ("name", "description", "presets", "overrides", "metric", "mode", "search",
            "num_samples", "scheduler", "validation", "space", "experiment")
# paths in the config that trials (other processes, other cwd) must see as absolute
PATH_KEYS = ("data.prepared_dir", "tokenizer.out_path", "tokenizer.model_path", "pca.out_path",
             "eval.judge_path", "eval.inception_weights")


class SweepError(ConfigError):
    """A sweep-space file is malformed, or a point of its space is not a valid config."""


# ----------------------------------------------------------------------------- the space file
@dataclass
class SweepSpec:
    name: str
    path: Path
    space: dict[str, dict]                       # key -> {"grid": [...]} | {"uniform": [lo, hi]} ...
    presets: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_fid"
    mode: str = "min"
    search: str = "grid"
    num_samples: int = 1                         # absent from the file: tune.num_samples
    scheduler: dict = field(default_factory=lambda: {"type": "asha", "grace_period": 0,
                                                     "reduction_factor": 2})
    validation: dict = field(default_factory=lambda: {"every": 0, "fid_samples": 200})
    experiment: str = ""                         # MLflow experiment ("" = mlflow.experiment)
    raw: dict = field(default_factory=dict)


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep-space file (keys, domains, metric, scheduler)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep-space file not found: {path} (e.g. experiments/sweeps/noise.yaml)")
    d = read_yaml(path)

    def fail(key: str, msg: str):
        return SweepError(f"{path}: '{key}' {msg}")

    unknown = sorted(set(d) - set(TOP_KEYS))
    if unknown:
        raise fail(unknown[0], f"is not a sweep key (valid: {list(TOP_KEYS)})")
    if not isinstance(d.get("space"), dict) or not d["space"]:
        raise fail("space", "must map parameter keys to values to search, e.g. "
                   "{'train.noise.sigma0': {'grid': [0, 8, 16, 32]}}")
    search = d.get("search", "grid")
    if search not in ("grid", "random"):
        raise fail("search", f"= {search!r}: must be 'grid' or 'random'")
    space = {}
    for key, dom in d["space"].items():
        if isinstance(dom, list):
            dom = {"grid" if search == "grid" else "choice": dom}
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
            raise fail(f"space.{key}", f"= {dom!r}: must be a list or one of "
                       + ", ".join(f"{{{k}: ...}}" for k in DOMAINS))
        kind, vals = next(iter(dom.items()))
        if not isinstance(vals, list) or not vals:
            raise fail(f"space.{key}.{kind}", f"= {vals!r}: must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(vals) != 2 or not all(isinstance(v, (int, float)) for v in vals) or vals[0] >= vals[1]:
                raise fail(f"space.{key}.{kind}", f"= {vals!r}: must be [low, high] with low < high")
            if kind == "loguniform" and vals[0] <= 0:
                raise fail(f"space.{key}.{kind}", f"= {vals!r}: needs low > 0")
        if search == "grid" and kind != "grid":
            raise fail(f"space.{key}", f"is {kind!r} but search is 'grid' (use search: random)")
        space[key] = {kind: vals}
    metric = d.get("metric", "val_fid")
    if metric not in REPORTED_METRICS:
        raise fail("metric", f"= {metric!r}: must be one of {list(REPORTED_METRICS)}")
    mode = d.get("mode", "min")
    if mode not in ("min", "max"):
        raise fail("mode", f"= {mode!r}: must be 'min' or 'max'")
    num_samples = d.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise fail("num_samples", f"= {num_samples!r}: must be an integer >= 1")
    sched = {"type": "asha", "grace_period": 0, "reduction_factor": 2, **(d.get("scheduler") or {})}
    if set(sched) - {"type", "grace_period", "reduction_factor"}:
        raise fail("scheduler", f"= {sched!r}: keys are type, grace_period, reduction_factor")
    if sched["type"] not in ("asha", "none"):
        raise fail("scheduler.type", f"= {sched['type']!r}: must be 'asha' or 'none'")
    if not isinstance(sched["grace_period"], int) or sched["grace_period"] < 0:
        raise fail("scheduler.grace_period", "must be an integer number of steps >= 0")
    if not isinstance(sched["reduction_factor"], (int, float)) or sched["reduction_factor"] <= 1:
        raise fail("scheduler.reduction_factor", "must be > 1")
    val = {"every": 0, "fid_samples": 200, **(d.get("validation") or {})}
    if set(val) - {"every", "fid_samples"}:
        raise fail("validation", f"= {val!r}: keys are every, fid_samples")
    for k in ("every", "fid_samples"):
        if not isinstance(val[k], int) or val[k] < 0:
            raise fail(f"validation.{k}", f"= {val[k]!r}: must be an integer >= 0")
    if metric == "val_fid" and val["fid_samples"] < 2:
        raise fail("validation.fid_samples", "must be >= 2 when the metric is val_fid")
    overrides = d.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise fail("overrides", "must map parameter keys to values")
    overrides = flatten(overrides)    # accept nested or dotted keys
    presets = d.get("presets") or []
    if not isinstance(presets, list):
        raise fail("presets", "must be a list of overlay names or paths")
    name = str(d.get("name") or path.stem)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise fail("name", f"= {name!r}: letters, digits, '-' and '_' only")
    return SweepSpec(name=name, path=path, space=space, presets=list(presets), overrides=overrides,
                     metric=metric, mode=mode, search=search, num_samples=num_samples,
                     scheduler=sched, validation=val, experiment=str(d.get("experiment") or ""),
                     raw=d)


def nest(flat: dict[str, Any]) -> dict:
    """{"train.noise.sigma0": 8} -> {"train": {"noise": {"sigma0": 8}}}."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def base_config_dict(spec: SweepSpec, params: str | Path = "params.yaml", presets=(), sets=()) -> dict:
    """params + the CLI's presets + the sweep's presets + its overrides + the CLI's --set,
    derived values resolved (the dict every trial starts from)."""
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                 for k, v in spec.overrides.items()] + list(sets)
    d = load_config_dict(params, overlays=[*presets, *spec.presets], overrides=overrides)
    cfg = load_config(d)
    # the sweep reports val metrics at checkpoint steps: validation.every sets that interval
    every = spec.validation["every"] or cfg.train.checkpoint_every
    d = deep_merge(d, nest({"train.checkpoint_every": min(every, cfg.train.steps),
                            "train.num_workers": 1}))
    return load_config(d).to_dict()


def space_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Points that must all be valid configs: every grid combination, with each random
    domain at its ends (or each of its choices)."""
    axes = []
    for key, dom in spec.space.items():
        kind, vals = next(iter(dom.items()))
        if kind in ("uniform", "loguniform"):
            vals = [float(vals[0]), float(vals[1])]
        elif kind == "randint":
            vals = [int(vals[0]), int(vals[1]) - 1]   # Ray's randint excludes the upper bound
        axes.append([(key, v) for v in vals])
    points = [dict(p) for p in itertools.islice(itertools.product(*axes), 10_000)]
    return points


def check_space(spec: SweepSpec, base: dict) -> int:
    """Every point of the space is a valid config on top of `base`; returns the grid size."""
    for point in space_points(spec):
        try:
            load_config(deep_merge(base, nest(point)))
        except ConfigError as e:
            raise SweepError(f"{spec.path}: the point {point} is not a valid config: {e}") from None
    grid = 1
    for dom in spec.space.values():
        if "grid" in dom:
            grid *= len(dom["grid"])
    return grid * spec.num_samples


def check_curriculum_grace(spec: SweepSpec, base: dict) -> None:
    """ASHA compares trials at equal steps. While a trial's RGB noise curriculum is still
    running its bits/dim and FID are worse by construction (it is trained on noisier images),
    so stopping it then is biased against the curriculum the sweep studies: the grace period
    must reach the end of the longest curriculum in the space (or use `scheduler.type: none`)."""
    if spec.scheduler["type"] != "asha":
        return
    steps = base["train"]["steps"]
    grace = min(spec.scheduler["grace_period"] or base["train"]["checkpoint_every"], steps)
    for point in space_points(spec):
        n = load_config(deep_merge(base, nest(point))).train.noise
        end = math.ceil(n.curriculum_frac * steps) if n.sigma0 > n.sigma_final else 0
        if grace < end:
            raise SweepError(
                f"{spec.path}: 'scheduler.grace_period' = {grace} steps stops trials before "
                f"the noise curriculum of {point} ends at step {end} of {steps}: ASHA would "
                "judge high-sigma0 trials while their images are still noisier by "
                f"construction. Set grace_period >= {end} or scheduler.type: none")


def tune_param_space(spec: SweepSpec) -> dict:
    from ray import tune
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {"params": {key: make[kind](vals) for key, dom in spec.space.items()
                       for kind, vals in dom.items()}}


def sweep_id(spec: SweepSpec, base: dict) -> str:
    """Tune experiment name: a changed space or base config never resumes an old sweep."""
    import hashlib
    blob = json.dumps({"space": spec.raw, "base": base}, sort_keys=True, default=str)
    return f"{spec.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def absolute_paths(base: dict, root: Path) -> dict:
    """Trials run in other processes: make the config's file paths absolute."""
    flat = flatten(base)
    fixed = {k: str((root / flat[k]).resolve()) for k in PATH_KEYS
             if k in flat and isinstance(flat[k], str) and flat[k] and not os.path.isabs(flat[k])}
    return deep_merge(base, nest(fixed))


# ----------------------------------------------------------------------------- trial side
class SampleQuality:
    """The cheap sample-quality proxy reported at each checkpoint: FID of `n` samples (CFG and
    temperature from `eval`) for the first `n` val captions/classes against those `n` val images,
    through the evaluation's own functions (domain judge on the shapes world)."""

    def __init__(self, cfg, n: int):
        from jetformer.data.dataset import ArrowImageDataset
        from jetformer.eval.fidelity import resolve_extractor
        self.cfg, self.n = cfg, n
        ds = ArrowImageDataset(cfg.data.prepared_dir, "val")
        self.n = min(n, len(ds))
        items = [ds[i] for i in range(self.n)]
        import torch
        self.real = torch.stack([it["image"] for it in items])           # uint8 [n, H, W, 3]
        self.labels = [int(it["label"]) for it in items]
        self.prompts = [it["captions"][0] if it["captions"] else "" for it in items]
        self.extractor = resolve_extractor(cfg.eval.feature_extractor, cfg.data.source)
        self.judge_path = judge_path(cfg) if self.extractor == "domain" else None
        self.tokenizer = None
        if cfg.model.conditioning == "text":
            from jetformer.data.tokenizer import TextTokenizer
            self.tokenizer = TextTokenizer(cfg.tokenizer.out_path)

    def __call__(self, checkpoint_dir: str) -> dict:
        import torch
        from jetformer.eval.fidelity import fidelity_metrics
        from jetformer.eval.sampling import sample_from_labels, sample_from_text
        from jetformer.train.checkpoint import load_trained
        model, cfg = load_trained(checkpoint_dir)
        e = cfg.eval
        with torch.random.fork_rng(devices=[]):
            if cfg.model.conditioning == "class":
                fake = sample_from_labels(model, self.labels, cfg_scale=e.cfg_scale,
                                          temperature=e.temperature, batch_size=e.batch_size, seed=cfg.seed)
            else:
                fake = sample_from_text(model, self.tokenizer, self.prompts,
                                        max_text_len=cfg.tokenizer.max_text_len, cfg_scale=e.cfg_scale,
                                        temperature=e.temperature, batch_size=e.batch_size, seed=cfg.seed)
        m = fidelity_metrics(fake, self.real, extractor=self.extractor, judge_path=self.judge_path,
                             inception_weights=e.inception_weights, batch_size=e.batch_size,
                             kid_subsets=10, seed=cfg.seed)
        return {"val_fid": m["fid"], "val_precision": m["precision"], "val_recall": m["recall"]}


def judge_path(cfg) -> str:
    """Where the `judge` stage writes the domain feature extractor."""
    path = getattr(cfg.eval, "judge_path", "") or "models/judge.pt"   # pipelines/judge.py --out
    return str(Path(path).resolve())


def _child_run(sweep: dict, cfg, trial_name: str, trial_id: str) -> str:
    """The trial's MLflow run under the sweep's parent, created with `parent_run_id=` (a fresh
    process: `nested=True` would mean nothing here), or reopened when a restored sweep resumes
    the trial. Later logging goes through the client with this run id."""
    import mlflow
    from mlflow.entities import Param
    from jetformer.train import tracking
    cl = tracking.client(cfg)
    found = cl.search_runs([sweep["experiment_id"]],
                           filter_string=f"tags.mlflow.parentRunId = '{sweep['parent_run_id']}' "
                                         f"and tags.`{TRIAL_TAG}` = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        cl.update_run(run_id, status="RUNNING")
        return run_id
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    run = mlflow.start_run(run_name=trial_name, experiment_id=sweep["experiment_id"],
                           parent_run_id=sweep["parent_run_id"],
                           tags={TRIAL_TAG: trial_id, SWEEP_TAG: sweep["name"],
                                 **tracking.run_tags(cfg, cfg.hash())})
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
              for k, v in sorted(cfg.flat().items())]
    for i in range(0, len(params), 100):
        cl.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def run_trial(config: dict, sweep: dict) -> None:
    """One Tune trial: `train_loop` on this trial's config, val metrics + checkpoint to Tune,
    curves to its MLflow child run."""
    import torch
    from ray import tune

    from jetformer.train import tracking
    from jetformer.train.launch import CSV_COLUMNS
    from jetformer.train.loop import train_loop

    os.chdir(sweep["cwd"])
    torch.set_num_threads(max(1, int(sweep["cpus_per_trial"])))
    ctx = tune.get_context()
    cfg = load_config(deep_merge(sweep["base"], nest(config["params"])))
    run_id = _child_run(sweep, cfg, ctx.get_trial_name(), ctx.get_trial_id())
    quality = SampleQuality(cfg, sweep["fid_samples"]) if sweep["fid_samples"] >= 2 else None

    def progress(row: dict) -> None:   # the same curves the pipeline's run logs
        if "event" not in row:
            tracking.log_metrics(cfg, run_id, {k: v for k, v in row.items()
                                               if k in CSV_COLUMNS and k != "step"}, int(row["step"]))

    def reporter(metrics: dict, checkpoint_dir: str | None) -> None:
        metrics = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if quality is not None and checkpoint_dir is not None:
            metrics.update(quality(checkpoint_dir))
        step = int(metrics["step"])
        tracking.log_metrics(cfg, run_id, {k: v for k, v in metrics.items()
                                           if k.startswith("val_")}, step=step)
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)         # copies the checkpoint; ASHA may stop here

    resume_dir = None
    restored = tune.get_checkpoint()
    if restored is not None:
        resume_dir = tempfile.mkdtemp(prefix="jetformer-resume-")
        restored.to_directory(resume_dir)
    try:
        train_loop(cfg, rank=0, world_size=1, reporter=reporter, progress=progress,
                   resume_from=resume_dir)
    except SystemExit as e:   # Ray stops a trial (ASHA) by sys.exit(0) inside tune.report
        if e.code in (0, None):
            tracking.client(cfg).set_tag(run_id, "stopped_early", "true")
        _end_run(cfg, run_id, "FINISHED" if e.code in (0, None) else "FAILED")
        raise
    except BaseException:
        _end_run(cfg, run_id, "FAILED")
        raise
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
    _end_run(cfg, run_id, "FINISHED")


def _end_run(cfg, run_id: str, status: str) -> None:
    import mlflow
    from jetformer.train import tracking
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)     # else mlflow's atexit hook would mark it FINISHED later
    else:
        tracking.end_run(cfg, run_id, status)


# ----------------------------------------------------------------------------- driver side
def _init_ray(cfg) -> bool:
    """Connect to `train.ray_address` / $RAY_ADDRESS, or start Ray locally; quiet. Returns
    whether this call started it (and so must shut it down)."""
    import ray
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)
    return True


def _parent_run(cfg, spec: SweepSpec, sid: str, state_file: Path, base: dict, fresh: bool) -> dict:
    """The sweep's parent MLflow run: reopened on restore, else created (params: the base
    config flat + the space)."""
    from mlflow.entities import Param
    from jetformer.train import tracking
    cl = tracking.client(cfg)
    exp_id = tracking.experiment_id(cl, cfg)
    if not fresh and state_file.is_file():
        state = json.loads(state_file.read_text())
        try:
            run = cl.get_run(state["parent_run_id"])
            if run.info.lifecycle_stage == "active":
                cl.update_run(run.info.run_id, status="RUNNING")
                return state
        except Exception:
            pass
    run = cl.create_run(exp_id, run_name=f"sweep-{sid}",
                        tags={PARENT_ROLE_TAG: "sweep", SWEEP_TAG: spec.name,
                              **tracking.run_tags(cfg, cfg.hash())})
    params = [Param(k, str(v)) for k, v in sorted(flatten(base).items())]
    params += [Param(f"sweep.space.{k}", json.dumps(v)) for k, v in spec.space.items()]
    params += [Param("sweep.metric", spec.metric), Param("sweep.mode", spec.mode),
               Param("sweep.search", spec.search), Param("sweep.num_samples", str(spec.num_samples)),
               Param("sweep.scheduler", json.dumps(spec.scheduler))]
    for i in range(0, len(params), 100):
        cl.log_batch(run.info.run_id, params=params[i:i + 100])
    state = {"parent_run_id": run.info.run_id, "experiment_id": exp_id,
             "tracking_uri": tracking.tracking_uri(cfg), "sweep_id": sid}
    atomic_write_text(state_file, json.dumps(state, indent=2))
    return state


def close_child_runs(cfg, parent_run_id: str, experiment_id: str, trials: dict[str, dict]) -> int:
    """Children still RUNNING after `fit` (stopped by ASHA, or killed): FINISHED when Tune
    finished the trial (tagged `stopped_early` if it did not reach the last step), else FAILED.
    Returns how many were closed."""
    from jetformer.train import tracking
    cl = tracking.client(cfg)
    closed = 0
    for run in cl.search_runs([experiment_id], filter_string=
                              f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        trial = trials.get(run.data.tags.get(TRIAL_TAG, ""), {})
        ok = trial.get("status") in ("completed", "stopped")
        if trial.get("status") == "stopped":
            cl.set_tag(run.info.run_id, "stopped_early", "true")
        cl.set_terminated(run.info.run_id, "FINISHED" if ok else "FAILED")
        closed += 1
    return closed


def _trial_table(results, spec: SweepSpec, steps: int) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        params = (r.config or {}).get("params", {})
        step = int(m.get("step", 0) or 0)
        status = "error" if r.error else ("completed" if step >= steps else "stopped")
        hist = r.metrics_dataframe
        best = None
        if hist is not None and spec.metric in getattr(hist, "columns", ()):
            col = hist[spec.metric].dropna()
            if len(col):
                best = float(col.min() if spec.mode == "min" else col.max())
        rows.append({"trial_id": m.get("trial_id") or Path(r.path).name, "status": status,
                     "step": step, **{k: params.get(k) for k in spec.space},
                     **{k: m.get(k) for k in REPORTED_METRICS if k in m},
                     f"best_{spec.metric}": best, "error": str(r.error).splitlines()[0] if r.error else ""})
    return rows


SEED_KEYS = ("seed", "train.seed")     # repeats of a setting, not settings to choose


def pick_best(rows: list[dict], spec: SweepSpec) -> dict | None:
    """The best setting by its final `metric` averaged over seeds (space keys in SEED_KEYS),
    among trials that reached the last step (ASHA-stopped trials were judged at fewer steps);
    all trials when none did. Returns its first trial's row with the mean metric and
    `num_seeds`."""
    def ok(r):
        v = r.get(spec.metric)
        return isinstance(v, (int, float)) and math.isfinite(v)
    pool = [r for r in rows if r["status"] == "completed" and ok(r)] or [r for r in rows if ok(r)]
    if not pool:
        return None
    groups: dict[tuple, list[dict]] = {}
    for r in pool:
        groups.setdefault(tuple(str(r.get(k)) for k in spec.space if k not in SEED_KEYS),
                          []).append(r)
    means = {g: sum(r[spec.metric] for r in rs) / len(rs) for g, rs in groups.items()}
    g = (min if spec.mode == "min" else max)(means, key=means.get)
    return {**groups[g][0], spec.metric: means[g], "num_seeds": len(groups[g])}


def best_overlay_text(best: dict, spec: SweepSpec, sid: str) -> str:
    import shlex
    values = {k: best[k] for k in spec.space if k not in SEED_KEYS}
    dvc = " ".join("-S " + shlex.quote(f"{k}={v}") for k, v in values.items())
    header = (f"# Best trial of sweep {sid} ({spec.path}): {best['trial_id']}, "
              f"{spec.metric} = {best[spec.metric]:.6g} at step {best['step']} (mean over "
              f"{best.get('num_seeds', 1)} seed(s)).\n"
              f"# Use it as an overlay:  python -m jetformer <command> --preset <this file>\n"
              f"# or as a DVC experiment: dvc exp run {dvc}\n"
              f"# (the sweep's fixed budget overrides are not included: {spec.overrides})\n")
    return header + yaml.safe_dump(nest(values), sort_keys=False)


def dvc_set_args(overlays, params: str | Path = "params.yaml") -> str:
    """`-S key=value ...` for `dvc exp run`: every key the overlays change in `params`, with
    derived values computed, e.g. `dvc exp run $(python -c "from jetformer.tune import
    dvc_set_args; print(dvc_set_args(['imagenet256']))")`."""
    base = load_config(params).flat()
    new = load_config(params, overlays=list(overlays)).flat()
    import shlex
    return " ".join("-S " + shlex.quote(f"{k}={json.dumps(v) if not isinstance(v, str) else v}")
                    for k, v in new.items() if base[k] != v)


def _rows_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()


def _summary_md(rows: list[dict], best: dict | None, spec: SweepSpec, sid: str, base: dict,
                wall_s: float, parent_run_id: str) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "error"))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    t = base["train"]
    lines = [f"# Sweep `{sid}`", "",
             f"Space `{spec.path}`; metric `{spec.metric}` ({spec.mode}); search {spec.search}; "
             f"scheduler {spec.scheduler}; {t['steps']} steps at batch {t['batch_size']} per trial; "
             f"validation every {t['checkpoint_every']} steps on {spec.validation['fid_samples']} "
             f"samples; wall time {wall_s / 60:.1f} min; MLflow parent run `{parent_run_id}`.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    if best:
        lines += ["", f"Best: `{best['trial_id']}` with "
                  + ", ".join(f"{k}={best[k]}" for k in spec.space if k not in SEED_KEYS)
                  + f" ({spec.metric} {best[spec.metric]:.4g}); overlay in `best.yaml`."]
    errors = [r for r in rows if r.get("error")]
    lines += [f"- `{r['trial_id']}` failed: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def run_sweep(space: str | Path, params: str | Path = "params.yaml", presets=(), sets=(),
              fresh: bool = False, out_dir: str | Path = "experiments/results/sweeps") -> dict:
    """Run (or restore) a sweep; returns {"sweep_id", "best", "trials", "parent_run_id", ...}."""
    spec = load_sweep(space)
    root = Path.cwd()
    base = absolute_paths(base_config_dict(spec, params, presets, sets), root)
    if spec.experiment:
        base = deep_merge(base, nest({"mlflow.experiment": spec.experiment}))
    cfg = load_config(base)
    if "num_samples" not in spec.raw:     # the file's value wins over the tune section's
        spec.num_samples = cfg.tune.num_samples
    n_trials = check_space(spec, base)
    check_curriculum_grace(spec, base)
    _check_inputs(cfg, spec)
    from jetformer.train import tracking
    base = deep_merge(base, nest({"mlflow.tracking_uri": tracking.tracking_uri(cfg)}))
    cfg = load_config(base)

    sid = sweep_id(spec, base)
    storage = Path(cfg.tune.storage_dir).resolve()
    exp_dir, state_file = storage / sid, storage / f"{sid}.mlflow.json"
    if fresh:
        shutil.rmtree(exp_dir, ignore_errors=True)
        state_file.unlink(missing_ok=True)
    state = _parent_run(cfg, spec, sid, state_file, base, fresh)

    # checkpoints at every validation make Tune warn about its state snapshots: expected here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    started = _init_ray(cfg)
    try:
        sweep = {"base": base, "cwd": str(root), "name": spec.name,
                 "cpus_per_trial": cfg.tune.cpus_per_trial,
                 "fid_samples": spec.validation["fid_samples"], **state}
        resources = {"cpu": cfg.tune.cpus_per_trial}
        if cfg.tune.gpus_per_trial:
            resources["gpu"] = cfg.tune.gpus_per_trial
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), resources)
        t0 = time.time()
        if not fresh and tune.Tuner.can_restore(str(exp_dir)):
            print(f"restoring interrupted sweep {sid} from {exp_dir} (--fresh to start over)")
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            steps = cfg.train.steps
            if spec.scheduler["type"] == "asha":
                grace = spec.scheduler["grace_period"] or cfg.train.checkpoint_every
                scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=min(grace, steps),
                                          reduction_factor=spec.scheduler["reduction_factor"])
            else:
                scheduler = FIFOScheduler()
            print(f"sweep {sid}: {n_trials} trial(s), {steps} steps each, metric {spec.metric} ({spec.mode}); Tune dir {exp_dir}")
            tuner = tune.Tuner(
                trainable, param_space=tune_param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                    num_samples=spec.num_samples, max_concurrent_trials=cfg.tune.max_concurrent_trials,
                    trial_name_creator=_trial_name, trial_dirname_creator=lambda t: t.trial_id),
                run_config=tune.RunConfig(
                    name=sid, storage_path=str(storage), verbose=1,
                    failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        results = tuner.fit()
        wall = time.time() - t0
    except BaseException:   # Ctrl-C or Ray trouble: the sweep stays restorable, its run says so
        tracking.client(cfg).set_terminated(state["parent_run_id"], "KILLED")
        raise
    finally:
        if started:
            import ray
            ray.shutdown()

    rows = _trial_table(results, spec, cfg.train.steps)
    trials = {r["trial_id"]: r for r in rows}
    closed = close_child_runs(cfg, state["parent_run_id"], state["experiment_id"], trials)
    best = pick_best(rows, spec)
    out = Path(out_dir) / spec.name
    atomic_write_text(out / "trials.csv", _rows_csv(rows))
    atomic_write_text(out / "summary.md", _summary_md(rows, best, spec, sid, base, wall, state["parent_run_id"]))
    if best is not None:
        atomic_write_text(out / "best.yaml", best_overlay_text(best, spec, sid))
    cl = tracking.client(cfg)
    pid = state["parent_run_id"]
    for f in ("trials.csv", "summary.md", "best.yaml"):
        if (out / f).is_file():
            cl.log_artifact(pid, str(out / f))
    if best is not None:
        cl.log_metric(pid, f"best_{spec.metric}", float(best[spec.metric]))
        for k in spec.space:
            if k not in SEED_KEYS:
                cl.set_tag(pid, f"best.{k}", str(best[k]))
    cl.set_terminated(pid, "FINISHED" if all(r["status"] != "error" for r in rows) else "FAILED")
    return {"sweep_id": sid, "experiment": cfg.mlflow.experiment, "best": best, "trials": rows, "parent_run_id": pid,
            "experiment_id": state["experiment_id"], "closed_runs": closed, "out_dir": out,
            "wall_s": wall}


def _trial_name(trial) -> str:
    vals = ",".join(f"{k.split('.')[-1]}={v}" for k, v in trial.config.get("params", {}).items())
    return f"{trial.trial_id}_{vals}"[:120]


def _check_inputs(cfg, spec: SweepSpec) -> None:
    """Fail before Ray starts when a stage the trials need has not run (a synthetic world and
    its judge are made here when missing, as `ablate` does)."""
    if cfg.data.source == "synthetic":
        from jetformer.ablate import ensure_inputs
        ensure_inputs(cfg)
    prepared = Path(cfg.data.prepared_dir)
    if not (prepared / "metadata.json").is_file():
        raise FileNotFoundError(f"prepared data not found in {prepared} (run `dvc repro prepare`)")
    if cfg.model.conditioning == "text" and not Path(cfg.tokenizer.out_path).is_file():
        raise FileNotFoundError(f"tokenizer not found: {cfg.tokenizer.out_path} (run `dvc repro tokenizer`)")
    if cfg.model.factoring == "pca" and not Path(cfg.pca.out_path).is_file():
        raise FileNotFoundError(f"PCA not found: {cfg.pca.out_path} (run `dvc repro fit_pca`)")
    if spec.validation["fid_samples"]:
        from jetformer.eval.fidelity import resolve_extractor
        if resolve_extractor(cfg.eval.feature_extractor, cfg.data.source) == "domain" \
                and not Path(judge_path(cfg)).is_file():
            raise FileNotFoundError(f"judge weights not found: {judge_path(cfg)} (run `dvc repro "
                                    "judge`, or set validation.fid_samples: 0 and metric "
                                    "val_bits_per_dim)")


def cli_sweep(args) -> int:
    res = run_sweep(args.space, params=args.params, presets=args.preset, sets=args.set, fresh=args.fresh)
    print(f"sweep {res['sweep_id']}: {len(res['trials'])} trials in {res['wall_s'] / 60:.1f} min, "
          f"MLflow parent run {res['parent_run_id']}")
    for r in res["trials"]:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r.items() if v not in (None, "")))
    if res["best"] is not None:
        print(f"best overlay: {res['out_dir'] / 'best.yaml'}")
    print(f"compare: python -m jetformer compare --experiment {res['experiment']} "
          f"--parent-run {res['parent_run_id']}")
    return 0 if all(r["status"] != "error" for r in res["trials"]) else 1
