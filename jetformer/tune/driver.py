"""The sweep driver: builds the Tuner (ASHA or FIFO) over the space, restores an interrupted
sweep, and reports: trial table, best setting as an overlay, the MLflow parent run.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import yaml

from jetformer.config import deep_merge, flatten, load_config
from jetformer.eval.judge import judge_path
from jetformer.runs import csv_text, dict_rows, init_ray, markdown_table
from jetformer.safe_io import atomic_write_text
from jetformer.train.tracking import ROLE_SWEEP, TAG_ROLE, TAG_SWEEP, TAG_TRIAL
from jetformer.tune.spec import (REPORTED_METRICS, SEED_KEYS, SweepSpec, absolute_paths,
                                 base_config_dict,
                                 check_curriculum_grace, check_space, load_sweep, nest,
                                 sweep_id, tune_param_space)
from jetformer.tune.trial import run_trial

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
                        tags={TAG_ROLE: ROLE_SWEEP, TAG_SWEEP: spec.name,
                              **tracking.run_tags(cfg, cfg.hash())})
    params = [Param(k, str(v)) for k, v in sorted(flatten(base).items())]
    params += [Param(f"sweep.space.{k}", json.dumps(v)) for k, v in spec.space.items()]
    params += [Param("sweep.metric", spec.metric), Param("sweep.mode", spec.mode),
               Param("sweep.search", spec.search),
               Param("sweep.num_samples", str(spec.num_samples)),
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
    running = (f"tags.mlflow.parentRunId = '{parent_run_id}' "
               "and attributes.status = 'RUNNING'")
    for run in cl.search_runs([experiment_id], filter_string=running):
        trial = trials.get(run.data.tags.get(TAG_TRIAL, ""), {})
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
                     f"best_{spec.metric}": best,
                     "error": str(r.error).splitlines()[0] if r.error else ""})
    return rows


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
              f"# Use it as an overlay:  python -m jetformer <command> "
              + "".join(f"--preset {p} " for p in spec.presets) + "--preset <this file>\n"
              f"# or as a DVC experiment: dvc exp run {dvc}\n"
              f"# (the sweep's fixed budget overrides are not included: {spec.overrides})\n")
    return header + yaml.safe_dump(nest(values), sort_keys=False)


def _summary_md(rows: list[dict], best: dict | None, spec: SweepSpec, sid: str, base: dict,
                wall_s: float, parent_run_id: str) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "error"))
    t = base["train"]
    lines = [f"# Sweep `{sid}`", "",
             f"Space `{spec.path}`; metric `{spec.metric}` ({spec.mode}); search {spec.search}; "
             f"scheduler {spec.scheduler}; {t['steps']} steps at batch {t['batch_size']} per "
             "trial; "
             f"validation every {t['checkpoint_every']} steps on {spec.validation['fid_samples']} "
             f"samples; wall time {wall_s / 60:.1f} min (this `sweep` call: a restored sweep "
             f"counts from its restore); MLflow parent run `{parent_run_id}`.", "",
             *markdown_table(keys, [[r.get(k) for k in keys] for r in rows])]
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
    sweep = {"base": base, "cwd": str(root), "name": spec.name,
             "cpus_per_trial": cfg.tune.cpus_per_trial,
             "fid_samples": spec.validation["fid_samples"], **state}
    started = init_ray(cfg.train.ray_address)
    try:
        t0 = time.time()
        results = _tuner(cfg, spec, sweep, sid, storage, fresh, n_trials).fit()
        wall = time.time() - t0
    except BaseException:   # Ctrl-C or Ray trouble: the sweep stays restorable, its run says so
        tracking.client(cfg).set_terminated(state["parent_run_id"], "KILLED")
        raise
    finally:
        if started:
            import ray
            ray.shutdown()
    return _report(cfg, spec, results, state, sid, base, wall, Path(out_dir) / spec.name)


def _tuner(cfg, spec: SweepSpec, sweep: dict, sid: str, storage: Path, fresh: bool,
           n_trials: int):
    """The sweep's Tuner: restored from `storage/sid` when an interrupted sweep is there
    (unless `fresh`), else a new one with ASHA (or FIFO) over the space."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # checkpoints at every validation make Tune warn about its state snapshots: expected here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resources = {"cpu": cfg.tune.cpus_per_trial}
    if cfg.tune.gpus_per_trial:
        resources["gpu"] = cfg.tune.gpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), resources)
    exp_dir = storage / sid
    if not fresh and tune.Tuner.can_restore(str(exp_dir)):
        print(f"restoring interrupted sweep {sid} from {exp_dir} (--fresh to start over)")
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    steps = cfg.train.steps
    if spec.scheduler["type"] == "asha":
        grace = spec.scheduler["grace_period"] or cfg.train.checkpoint_every
        scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=min(grace, steps),
                                  reduction_factor=spec.scheduler["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    print(f"sweep {sid}: {n_trials} trial(s), {steps} steps each, metric {spec.metric} "
          f"({spec.mode}); Tune dir {exp_dir}")
    return tune.Tuner(
        trainable, param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, scheduler=scheduler,
            num_samples=spec.num_samples, max_concurrent_trials=cfg.tune.max_concurrent_trials,
            trial_name_creator=_trial_name, trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(
            name=sid, storage_path=str(storage), verbose=1,
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _report(cfg, spec: SweepSpec, results, state: dict, sid: str, base: dict, wall: float,
            out: Path) -> dict:
    """After `fit`: close the trials' runs, write trials.csv / summary.md / best.yaml into
    `out`, log them and the best setting to the parent run; returns run_sweep's dict."""
    from jetformer.train import tracking
    rows = _trial_table(results, spec, cfg.train.steps)
    trials = {r["trial_id"]: r for r in rows}
    pid = state["parent_run_id"]
    closed = close_child_runs(cfg, pid, state["experiment_id"], trials)
    best = pick_best(rows, spec)
    atomic_write_text(out / "trials.csv", csv_text(*dict_rows(rows)))
    atomic_write_text(out / "summary.md", _summary_md(rows, best, spec, sid, base, wall, pid))
    if best is not None:
        atomic_write_text(out / "best.yaml", best_overlay_text(best, spec, sid))
    cl = tracking.client(cfg)
    for f in ("trials.csv", "summary.md", "best.yaml"):
        if (out / f).is_file():
            cl.log_artifact(pid, str(out / f))
    if best is not None:
        cl.log_metric(pid, f"best_{spec.metric}", float(best[spec.metric]))
        for k in spec.space:
            if k not in SEED_KEYS:
                cl.set_tag(pid, f"best.{k}", str(best[k]))
    cl.set_terminated(pid, "FINISHED" if all(r["status"] != "error" for r in rows) else "FAILED")
    return {"sweep_id": sid, "experiment": cfg.mlflow.experiment, "best": best, "trials": rows,
            "parent_run_id": pid, "experiment_id": state["experiment_id"],
            "closed_runs": closed, "out_dir": out, "wall_s": wall}


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
        raise FileNotFoundError(f"tokenizer not found: {cfg.tokenizer.out_path} (run `dvc repro "
                                f"tokenizer`)")
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
    res = run_sweep(args.space, params=args.params, presets=args.preset, sets=args.set,
                    fresh=args.fresh)
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
