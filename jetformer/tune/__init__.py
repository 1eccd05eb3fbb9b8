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
from jetformer.tune.driver import (best_overlay_text, cli_sweep, close_child_runs, pick_best,
                                   run_sweep)
from jetformer.tune.spec import (PATH_KEYS, REPORTED_METRICS, SEED_KEYS, SweepError, SweepSpec,
                                 absolute_paths, base_config_dict, check_curriculum_grace,
                                 check_space, dvc_set_args, load_sweep, nest, space_points,
                                 sweep_id, tune_param_space)
from jetformer.tune.trial import SampleQuality, run_trial

__all__ = ["PATH_KEYS", "REPORTED_METRICS", "SEED_KEYS", "SampleQuality", "SweepError",
           "SweepSpec", "absolute_paths", "base_config_dict", "best_overlay_text",
           "check_curriculum_grace", "check_space", "cli_sweep", "close_child_runs",
           "dvc_set_args", "load_sweep", "nest", "pick_best", "run_sweep", "run_trial",
           "space_points", "sweep_id", "tune_param_space"]
