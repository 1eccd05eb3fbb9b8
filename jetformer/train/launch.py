"""Ray Train launcher: `run_training(cfg)` trains on `train.num_workers` workers and writes the
stage outputs. All Ray-specific code of the repo's training lives here.

  * Ray: `train.ray_address` or `$RAY_ADDRESS` connects to a cluster, else a quiet local Ray.
    `TorchTrainer` + `ScalingConfig(num_workers, use_gpu)`; gloo on CPU, nccl on GPUs.
  * Identity and resume: the Ray run is named by `training_hash(cfg, data fingerprint)` under
    the absolute `train.storage_dir` (outside DVC outputs, which DVC deletes before a re-run).
    An interrupted `dvc repro` with the same parameters resumes from the last checkpoint, a
    changed config starts a new run, a finished run is not trained again.
  * `FailureConfig(max_failures)`: a dead worker restarts the group from the latest checkpoint.
  * Console: one progress line per `train.log_every` updates, sent by rank 0 through a Ray
    queue and printed (and logged to MLflow) by the driver; Ray's own logs go to its log files.
  * Stop: Ctrl-C or SIGTERM (preemption, `timeout`, `kill`) marks the MLflow run KILLED and
    leaves the last checkpoint to resume from; the stage exits non-zero.
  * Outputs: `<train.out_dir>/model.pt`, `metrics/train.json` (with the MLflow run id),
    `plots/train.csv`, sample grids in `plots/train_samples/`, and the MLflow run. The run id
    is not inside `train.out_dir`, so the exported model is the same file for the same
    training whichever tracking store logged it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import queue as queue_lib
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from jetformer.config import Config, config_from_dict
from jetformer.runs import init_ray
from jetformer.stage import sigterm_raises
from jetformer.train import checkpoint as ckpt
from jetformer.train import tracking
from jetformer.train.loop import NonFiniteLossError, load_inputs, train_loop

FINAL_MARKER = "final.json"     # in the run dir once a run has finished

CSV_COLUMNS = ("step", "stage", "epoch", "loss", "bits_per_dim", "text_nll", "logdet_per_dim",
               "prior_nll_per_dim", "sigma_rgb", "lr", "grad_norm", "examples_per_s",
               "val_bits_per_dim", "val_text_nll")


# ----------------------------------------------------------------------------- config / paths
def absolute_paths(cfg: Config, root: Path, store: Path | None = None) -> Config:
    """The config with every path made absolute (Ray workers run in their own cwd): inputs
    and outputs against the working copy `root`, the Ray storage against `store` (the
    repository that keeps runs across `dvc exp run --temp` copies; default `root`)."""
    def ab(p: str, base: Path = root) -> str:
        return str((base / p).resolve()) if p else p
    return replace(cfg,
                   data=replace(cfg.data, prepared_dir=ab(cfg.data.prepared_dir)),
                   tokenizer=replace(cfg.tokenizer, out_path=ab(cfg.tokenizer.out_path)),
                   pca=replace(cfg.pca, out_path=ab(cfg.pca.out_path)),
                   train=replace(cfg.train, storage_dir=ab(cfg.train.storage_dir, store or root),
                                 out_dir=ab(cfg.train.out_dir)))


def data_fingerprint(cfg: Config) -> str:
    """What the prepared inputs are (metadata, shard names and sizes, tokenizer, PCA): new
    data under the same parameters must not resume an old run either. (Not the report: it
    holds timings, and identical data prepared again should still resume.)"""
    prepared = Path(cfg.data.prepared_dir)
    shards = sorted(f"{p.relative_to(prepared)}:{p.stat().st_size}"
                    for p in prepared.glob("*/*.arrow"))
    parts = [tracking.file_hash(prepared / "metadata.json"), ";".join(shards)]
    if cfg.model.conditioning == "text":
        parts.append(tracking.file_hash(Path(cfg.tokenizer.out_path)))
    if cfg.model.factoring == "pca":
        parts.append(tracking.file_hash(Path(cfg.pca.out_path)))
    return ",".join(parts)


# ----------------------------------------------------------------------------- Ray set-up
def _use_gpu(cfg: Config, local: bool) -> bool:
    if cfg.train.use_gpu in ("true", "false"):
        return cfg.train.use_gpu == "true"
    if local:
        return torch.cuda.is_available()
    import ray
    return ray.cluster_resources().get("GPU", 0) >= cfg.train.num_workers


def _train_fn(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    q = config["queue"]

    def reporter(metrics: dict, checkpoint_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=(Checkpoint.from_directory(checkpoint_dir)
                                              if checkpoint_dir else None))

    def progress(row: dict) -> None:
        if rank == 0:
            q.put(row)

    resume = ray.train.get_checkpoint()
    try:
        if resume is None:
            train_loop(cfg, rank=rank, world_size=world_size, reporter=reporter,
                       progress=progress, device=device)
        else:
            with resume.as_directory() as d:
                train_loop(cfg, rank=rank, world_size=world_size, reporter=reporter,
                           progress=progress, resume_from=d, device=device)
    except NonFiniteLossError as e:
        # every rank sees the same global loss and stops at the same update; returning
        # normally keeps Ray from retrying a run that would diverge again
        if rank == 0:
            q.put({"event": "diverged", "message": str(e)})


# ----------------------------------------------------------------------------- console + MLflow
def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(row: dict) -> str:
    parts = [f"step {row['step']:>{len(str(row['total_steps']))}}/{row['total_steps']}",
             f"loss {row['loss']:.4f}", f"bits/dim {row['bits_per_dim']:.3f}"]
    if math.isfinite(row.get("text_nll", float("nan"))):
        parts.append(f"text nll {row['text_nll']:.3f}")
    parts += [f"sigma {row['sigma_rgb']:.2f}", f"lr {row['lr']:.2e}",
              f"|g| {row['grad_norm']:.2f}", f"{row['examples_per_s']:.1f} ex/s",
              f"ETA {_duration(row['eta_s'])}"]
    return "train: " + " | ".join(parts)


class _Monitor(threading.Thread):
    """Driver thread: prints rank 0's progress rows and logs them to MLflow."""

    def __init__(self, q, cfg: Config, run_id: str):
        super().__init__(daemon=True)
        self.q, self.cfg, self.run_id = q, cfg, run_id
        self.stop_event = threading.Event()
        self.events: list[dict] = []
        self.logged_steps: set[int] = set()

    def handle(self, row: dict) -> None:
        event = row.get("event")
        if event == "start":
            how = f"resuming at step {row['step']}" if row["resumed"] else "starting"
            print(f"train: {row['world_size']} worker(s) on {row['device']}, {how} "
                  f"({row['total_steps']} steps)", flush=True)
            self.events.append(row)
        elif event in ("diverged",):
            self.events.append(row)
        elif event == "val":
            vals = {k: v for k, v in row.items() if k.startswith("val_")}
            print("train: step {} | ".format(row["step"]) +
                  " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in vals.items()), flush=True)
            tracking.log_metrics(self.cfg, self.run_id, vals, row["step"])
        elif row["step"] not in self.logged_steps:
            print(progress_line(row), flush=True)
            self.logged_steps.add(row["step"])
            tracking.log_metrics(self.cfg, self.run_id,
                                 {k: v for k, v in row.items() if k in CSV_COLUMNS and k != "step"},
                                 row["step"])

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.drain(timeout=0.5)

    def drain(self, timeout: float = 0.0) -> None:
        from ray.util.queue import Empty
        try:
            while True:
                self.handle(self.q.get(block=timeout > 0, timeout=timeout or None))
        except (Empty, queue_lib.Empty):
            return
        except Exception as e:  # never let console/MLflow trouble kill the training
            print(f"train: progress monitor: {type(e).__name__}: {e}", flush=True)


# ----------------------------------------------------------------------------- the run
def _fit(cfg: Config, run_name: str, run_id: str, logged: set[int] = frozenset()):
    """TorchTrainer.fit(); returns (final checkpoint directory, steps logged to MLflow: `logged`
    before, by an interrupted process, plus those logged live now)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    t = cfg.train
    address = t.ray_address or os.environ.get("RAY_ADDRESS", "")
    main = threading.current_thread() is threading.main_thread()
    ours = signal.getsignal(signal.SIGTERM) if main else None
    started = init_ray(address)
    # ray.init replaces the SIGTERM handler (Python: sys.exit; its core worker's C++ one aborts
    # the driver); put ours (`sigterm_raises`: unwind, mark the run KILLED) back
    if main and ours is not None:
        signal.signal(signal.SIGTERM, ours)
    try:
        use_gpu = _use_gpu(cfg, local=not address)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        per_worker = {"CPU": min(1.0, cpus / t.num_workers)} if not address else {"CPU": 1.0}
        threads = max(1, int(cpus // t.num_workers)) if not address and not use_gpu else 0
        q = Queue(actor_options={"num_cpus": 0})
        run_dir = Path(t.storage_dir) / run_name
        config = {"cfg": cfg.to_dict(), "queue": q, "threads": threads, "use_gpu": use_gpu}
        trainer = TorchTrainer(
            _train_fn, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=None if use_gpu else per_worker),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=run_name, storage_path=t.storage_dir,
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        monitor = _Monitor(q, cfg, run_id)
        monitor.logged_steps |= set(logged)       # a resumed run re-reports a few steps
        monitor.start()
        try:
            result = trainer.fit()
        except (KeyboardInterrupt, SystemExit):   # Ray's SIGINT handler aborts, then exits
            print(f"train: interrupted; run it again (dvc repro) to resume from the last "
                  f"checkpoint in {run_dir}", flush=True)
            raise
        except Exception as e:
            raise RuntimeError(f"training failed ({type(e).__name__}): {e}\nRay run dir: "
                               f"{run_dir}; worker logs: <ray temp dir>/session_latest/logs/"
                               "train/") from None
        finally:
            monitor.stop_event.set()
            monitor.join(timeout=5)
            monitor.drain()
        diverged = [e for e in monitor.events if e.get("event") == "diverged"]
        if diverged:
            where = f" under {run_dir}" if result.checkpoint is not None else ""
            raise NonFiniteLossError(diverged[0]["message"] + where)
        if result.checkpoint is None:
            raise RuntimeError(f"training finished without a checkpoint (Ray run dir {run_dir})")
        return result.checkpoint.path, monitor.logged_steps
    finally:
        if started:
            ray.shutdown()


def _write_json(path: Path, obj: dict) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_curves(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in row.items()})
    ckpt.atomic_write_bytes(path, buf.getvalue().encode())


def summary_metrics(state: dict, wall_time_s: float, num_workers: int, run_id: str = "") -> dict:
    """`metrics/train.json`: final train and val bits/dim, text NLL, steps, throughput, time,
    and the MLflow run id (evaluation nests its runs under it)."""
    m = state["metrics"]
    last = state["history"][-1] if state["history"] else {}

    def num(v):
        return round(float(v), 6) if v is not None and math.isfinite(float(v)) else None
    return {"steps": int(state["step"]), "num_workers": num_workers,
            "train_loss": num(last.get("loss")),
            "train_bits_per_dim": num(last.get("bits_per_dim")),
            "train_text_nll": num(last.get("text_nll")),
            "val_bits_per_dim": num(m.get("val_bits_per_dim")),
            "val_text_nll": num(m.get("val_text_nll")),
            "examples_per_s": num(m.get("examples_per_s_mean")),
            "train_time_s": num(state["train_time_s"]), "wall_time_s": num(wall_time_s),
            "mlflow_run_id": run_id}


def run_training(cfg: Config, *, metrics_path: str | Path = "metrics/train.json",
                 curves_path: str | Path = "plots/train.csv",
                 samples_dir: str | Path = "plots/train_samples",
                 tags: dict[str, str] | None = None) -> dict:
    """Train `cfg` with Ray Train and write every output of the `train` stage; returns the
    contents of `metrics/train.json` (plus `run_id`, `run_dir`, `checkpoint`).

    Relative paths resolve against the working copy (the directory holding dvc.yaml), the
    Ray storage against `tracking.store_root()`. `tags` are added to a new MLflow run."""
    start = time.time()
    root = tracking.project_root()
    cfg = absolute_paths(cfg, root, tracking.store_root())
    load_inputs(cfg)  # missing data/tokenizer/PCA fail here, before Ray starts
    run_hash = ckpt.training_hash(cfg, extra=data_fingerprint(cfg))
    run_name = f"train-{run_hash}"
    run_dir = Path(cfg.train.storage_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)

    id_file = run_dir / "mlflow_run_id"
    old_id = id_file.read_text().strip() if id_file.is_file() else None
    run_id = tracking.start_run(cfg, cfg.mlflow.run_name or run_name, run_hash, old_id, tags)
    ckpt.atomic_write_bytes(id_file, run_id.encode())

    marker = run_dir / FINAL_MARKER
    final = json.loads(marker.read_text()) if marker.is_file() else None
    logged = tracking.metric_steps(cfg, run_id, "loss")   # by an earlier, interrupted process
    if final and (Path(final["checkpoint"]) / ckpt.STATE_FILE).is_file():
        print(f"train: run {run_name} already finished; exporting its final checkpoint", flush=True)
        checkpoint_path, wall = final["checkpoint"], final["wall_time_s"]
    else:
        try:
            with sigterm_raises():
                checkpoint_path, logged = _fit(cfg, run_name, run_id, logged)
        except BaseException as e:
            interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
            tracking.end_run(cfg, run_id, status="KILLED" if interrupted else "FAILED")
            raise
        wall = time.time() - start
        _write_json(marker, {"checkpoint": checkpoint_path, "wall_time_s": wall})

    state = ckpt.load_state(checkpoint_path)
    for row in state["history"]:  # curves the live monitor did not log (e.g. after a restart)
        if row["step"] not in logged:
            tracking.log_metrics(cfg, run_id, {k: v for k, v in row.items()
                                               if k in CSV_COLUMNS and k != "step"}, row["step"])
    out_dir = Path(cfg.train.out_dir)
    for stale in out_dir.glob("mlflow_run.json"):   # older layouts kept the run id here
        stale.unlink()
    model_file = ckpt.export_model(state, out_dir)

    summary = summary_metrics(state, wall, cfg.train.num_workers, run_id)
    metrics_path, curves_path, samples_dir = (root / metrics_path, root / curves_path,
                                              root / samples_dir)
    _write_json(metrics_path, summary)
    write_curves(curves_path, state["history"])
    if samples_dir.exists():
        shutil.rmtree(samples_dir)
    samples_dir.mkdir(parents=True)
    # grids as images only (`dvc plots show` fails on other files); their captions go to MLflow
    listings = Path(tempfile.mkdtemp(prefix="jetformer-samples-"))
    for name, data in state["samples"].items():
        ckpt.atomic_write_bytes((samples_dir if name.endswith(".png") else listings) / name, data)

    tracking.log_metrics(cfg, run_id, {f"final_{k}": v for k, v in summary.items()
                                       if v is not None and k != "mlflow_run_id"},
                         summary["steps"])
    tracking.log_artifact(cfg, run_id, metrics_path, "metrics")
    tracking.log_artifact(cfg, run_id, curves_path, "plots")
    tracking.log_artifact(cfg, run_id, samples_dir, "samples")
    tracking.log_artifact(cfg, run_id, listings, "samples")
    shutil.rmtree(listings)
    tracking.log_artifact(cfg, run_id, model_file, "checkpoint")
    tracking.end_run(cfg, run_id)
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)
    print(f"train: done in {_duration(wall)}: {summary['steps']} steps, train bits/dim "
          f"{fmt(summary['train_bits_per_dim'], '.3f')}, val bits/dim "
          f"{fmt(summary['val_bits_per_dim'], '.3f')}, {fmt(summary['examples_per_s'], '.1f')} "
          f"ex/s; checkpoint {model_file}; MLflow run {run_id}", flush=True)
    return {**summary, "run_id": run_id, "run_dir": str(run_dir), "checkpoint": str(model_file)}
