"""One sweep trial, run in a Ray Tune worker process: `train_loop` on the trial's config, the
sample-quality proxy at each checkpoint, `tune.report`, and the trial's MLflow child run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from jetformer.config import deep_merge, load_config
from jetformer.eval.judge import judge_path
from jetformer.train.tracking import TAG_SWEEP, TAG_TRIAL
from jetformer.tune.spec import nest

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
                                          temperature=e.temperature, batch_size=e.batch_size,
                                          seed=cfg.seed)
            else:
                fake = sample_from_text(model, self.tokenizer, self.prompts,
                                        max_text_len=cfg.tokenizer.max_text_len,
                                        cfg_scale=e.cfg_scale, temperature=e.temperature,
                                        batch_size=e.batch_size, seed=cfg.seed)
        m = fidelity_metrics(fake, self.real, extractor=self.extractor, judge_path=self.judge_path,
                             inception_weights=e.inception_weights, batch_size=e.batch_size,
                             kid_subsets=10, seed=cfg.seed)
        return {"val_fid": m["fid"], "val_precision": m["precision"], "val_recall": m["recall"]}


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
                                         f"and tags.`{TAG_TRIAL}` = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        cl.update_run(run_id, status="RUNNING")
        return run_id
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    run = mlflow.start_run(run_name=trial_name, experiment_id=sweep["experiment_id"],
                           parent_run_id=sweep["parent_run_id"],
                           tags={TAG_TRIAL: trial_id, TAG_SWEEP: sweep["name"],
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
                                               if k in CSV_COLUMNS and k != "step"},
                                 int(row["step"]))

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
