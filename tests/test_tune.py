"""Ray Tune sweeps: the sweep-space file, and a 2-trial sweep with a micro budget that runs under
Ray Tune (one Ray start), logs child MLflow runs under a parent, writes the best trial as an
overlay, and is restored (not rerun) when started again."""
import csv

import pytest
import yaml

from jetformer.config import REPO_ROOT, ConfigError, load_config, load_config_dict
from jetformer.tune import (SweepError, base_config_dict, best_overlay_text, check_space,
                            check_curriculum_grace, load_sweep, pick_best, space_points,
                            sweep_id)

from conftest import TINY_OVERRIDES

PARAMS = REPO_ROOT / "params.yaml"
NOISE = REPO_ROOT / "experiments" / "sweeps" / "noise.yaml"


def _write(path, obj):
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def test_default_noise_sweep_covers_the_paper_curve_with_seeds_and_no_biased_stopping():
    spec = load_sweep(NOISE)
    sigma0 = spec.space["train.noise.sigma0"]["grid"]
    assert sigma0 == [0.0, 8.0, 16.0, 32.0, 64.0]
    assert len(spec.space["train.seed"]["grid"]) >= 2                # >= 2 seeds per sigma0
    base = base_config_dict(spec, PARAMS)
    assert check_space(spec, base) == len(sigma0) * 2
    assert base["train"]["num_workers"] == 1          # one process per trial
    assert base["train"]["checkpoint_every"] == spec.validation["every"]
    assert base["data"]["synthetic"]["world"] == "photo"             # the table2 setting
    assert spec.scheduler["type"] == "none" and spec.metric in ("val_fid", "val_bits_per_dim")
    check_curriculum_grace(spec, base)                # passes: no early stopping
    assert "biased" in NOISE.read_text() or "bias the sweep" in NOISE.read_text()  # says why


def test_asha_grace_period_must_reach_the_end_of_the_curriculum(tmp_path):
    space = {"train.noise.sigma0": [0.0, 32.0], "train.noise.curriculum_frac": [0.5]}
    early = _write(tmp_path / "early.yaml", {"space": space, "scheduler": {
        "type": "asha", "grace_period": 100}})
    spec = load_sweep(early)
    base = base_config_dict(spec, PARAMS, sets=["train.steps=600"])
    with pytest.raises(SweepError, match="ends at step 300 of 600.*grace_period >= 300"):
        check_curriculum_grace(spec, base)
    ok = _write(tmp_path / "ok.yaml", {"space": space, "scheduler": {
        "type": "asha", "grace_period": 300}})
    check_curriculum_grace(load_sweep(ok), base)
    flat = _write(tmp_path / "flat.yaml", {"space": {"train.noise.sigma0": [0.0]},
                                           "scheduler": {"type": "asha", "grace_period": 10}})
    check_curriculum_grace(load_sweep(flat), base)    # no curriculum: nothing to protect


def test_space_parsing_grid_random_and_points(tmp_path):
    f = _write(tmp_path / "s.yaml", {
        "search": "random", "num_samples": 3,
        "space": {"train.noise.sigma0": [0, 16],                    # list -> choice under random
                  "train.lr": {"loguniform": [1e-4, 1e-2]},
                  "train.noise.curriculum_frac": {"grid": [0.5, 1.0]}}})
    spec = load_sweep(f)
    assert spec.space["train.noise.sigma0"] == {"choice": [0, 16]}
    pts = space_points(spec)
    assert len(pts) == 2 * 2 * 2 and {"train.noise.sigma0": 16, "train.lr": 1e-2,
                                       "train.noise.curriculum_frac": 0.5} in pts
    assert check_space(spec, base_config_dict(spec, PARAMS)) == 2 * 3   # grid size x samples
    from ray import tune
    from jetformer.tune import tune_param_space
    ps = tune_param_space(spec)["params"]
    assert isinstance(ps["train.lr"], tune.search.sample.Float)
    assert ps["train.noise.curriculum_frac"] == {"grid_search": [0.5, 1.0]}


@pytest.mark.parametrize("content, fragment", [
    ({"space": {}}, "'space'"),
    ({"space": {"train.noise.sigma0": [0, 8]}, "metric": "fid50k"}, "'metric'"),
    ({"space": {"train.noise.sigma0": [0, 8]}, "sheduler": {}}, "'sheduler'"),
    ({"space": {"train.noise.sigma0": {"uniform": [8, 0]}}, "search": "random"}, "low < high"),
    ({"space": {"train.noise.sigma0": {"uniform": [0, 8]}}}, "search is 'grid'"),
    ({"space": {"train.noise.sigmaa0": [0, 8]}}, "train.noise.sigmaa0"),        # unknown key
    ({"space": {"train.noise.sigma0": [0, -8]}}, "train.noise.sigma0"),         # invalid value
    ({"space": {"train.noise.sigma_final": [0, 99]}}, "sigma_final"),           # > sigma0
    ({"space": {"train.noise.sigma0": [0, 8]}, "scheduler": {"type": "hyperband"}},
     "scheduler.type"),
])
def test_bad_sweep_files_fail_before_ray(tmp_path, content, fragment):
    f = _write(tmp_path / "bad.yaml", content)
    with pytest.raises(ConfigError) as e:
        spec = load_sweep(f)
        check_space(spec, base_config_dict(spec, PARAMS))
    assert fragment in str(e.value) and "bad.yaml" in str(e.value)


def test_sweep_id_changes_with_space_and_base(tmp_path):
    spec = load_sweep(NOISE)
    base = base_config_dict(spec, PARAMS)
    other = base_config_dict(spec, PARAMS, sets=["train.lr=5e-4"])
    assert sweep_id(spec, base) == sweep_id(load_sweep(NOISE), base)
    assert sweep_id(spec, base) != sweep_id(spec, other)


def test_best_trial_pick_and_overlay(tmp_path):
    """The best sigma0 by its mean over seeds among completed trials; the overlay leaves the
    seed out."""
    spec = load_sweep(NOISE)

    def row(tid, status, step, sigma0, seed, fid):
        return {"trial_id": tid, "status": status, "step": step, "train.noise.sigma0": sigma0,
                "train.noise.sigma_final": 0.0, "train.noise.curriculum_frac": 1.0,
                "train.seed": seed, "val_fid": fid}
    rows = [row("a", "stopped", 300, 0.0, 0, 1.0),        # stopped early: judged at fewer steps
            row("b", "completed", 600, 16.0, 0, 6.0), row("b1", "completed", 600, 16.0, 1, 9.0),
            row("c", "completed", 600, 32.0, 0, 5.0), row("c1", "completed", 600, 32.0, 1, 12.0)]
    best = pick_best(rows, spec)
    assert best["train.noise.sigma0"] == 16.0 and best["val_fid"] == 7.5   # mean 7.5 < 8.5
    assert best["num_seeds"] == 2
    f = tmp_path / "best.yaml"
    f.write_text(best_overlay_text(best, spec, "noise-x"))
    assert "dvc exp run -S train.noise.sigma0=16.0" in f.read_text()
    assert "seed" not in yaml.safe_load(f.read_text())["train"]
    cfg = load_config(PARAMS, overlays=[f])
    assert cfg.train.noise.sigma0 == 16.0 and cfg.train.noise.curriculum_frac == 1.0


# ----------------------------------------------------------------------------- under Ray
def build_micro_project(root, *extra_overrides):
    """A micro shapes world (8 px, class-conditional) prepared in `root`, with an untrained judge
    at the judge stage's path (`root/models/judge.pt`; tests chdir to `root`). Returns the
    params file. An untrained judge gives meaningless but valid FIDs."""
    import torch
    from jetformer.data.prepare import prepare
    from jetformer.eval.judge import Judge, save_judge
    params = load_config_dict(PARAMS, overrides=TINY_OVERRIDES + (
        "model.conditioning=class", "train.task=class", "train.steps=6", "train.log_every=2",
        "train.val_images=8", "train.sample_prompts=2", "eval.batch_size=8", "eval.num_samples=8",
        f"data.synthetic.out_dir={root / 'raw'}", "data.synthetic.num_train=40",
        "data.synthetic.num_val=12", "data.synthetic.min_side=16", "data.synthetic.max_side=24",
        "data.synthetic.bad_files=false", f"data.prepared_dir={root / 'prepared'}",
        "data.workers=1",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", "mlflow.experiment=microtest",
        f"tune.storage_dir={root / 'tune'}", "tune.max_concurrent_trials=2",
        "tune.cpus_per_trial=1",
        f"train.storage_dir={root / 'ray_runs'}", "train.max_failures=0") + tuple(extra_overrides))
    params_file = _write(root / "params.yaml", params)
    prepare(load_config(params_file))
    torch.manual_seed(0)
    save_judge(Judge({"shape": ["circle", "square", "triangle"]}, resolution=8, width=8,
                     feature_dim=16), root / "models" / "judge.pt")
    return params_file


@pytest.fixture(scope="module")
def micro_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_project")
    params_file = build_micro_project(root)
    space = _write(root / "space.yaml", {
        "name": "micro", "space": {"train.noise.sigma0": {"grid": [0.0, 4.0]},
                                   "train.noise.curriculum_frac": {"grid": [0.5]}},
        "metric": "val_fid", "mode": "min",
        "scheduler": {"type": "asha", "grace_period": 3, "reduction_factor": 2},
        "validation": {"every": 3, "fid_samples": 8}})
    return root, params_file, space


@pytest.mark.slow
def test_two_trial_sweep_under_ray_tune_logs_nested_mlflow_runs(micro_project, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient
    from jetformer.tune import run_sweep
    root, params_file, space = micro_project
    monkeypatch.chdir(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        res = run_sweep(space, params=params_file, out_dir=root / "results")
        again = run_sweep(space, params=params_file, out_dir=root / "results")   # restore
    finally:
        ray.shutdown()

    assert (len(res["trials"]) == 2
            and {r["status"] for r in res["trials"]} <= {"completed", "stopped"})
    assert sorted(r["train.noise.sigma0"] for r in res["trials"]) == [0.0, 4.0]
    assert any(r["status"] == "completed" and r["step"] == 6 for r in res["trials"])

    cl = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert cl.get_experiment(res["experiment_id"]).name == "microtest"
    parent = cl.get_run(res["parent_run_id"])
    assert parent.data.tags["jetformer.role"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["train.steps"] == "6"
    children = cl.search_runs([res["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{res['parent_run_id']}'")
    assert len(children) == 2
    by_trial = {r["trial_id"]: r for r in res["trials"]}
    for child in children:
        trial = by_trial[child.data.tags["ray.trial_id"]]
        assert child.info.status == "FINISHED"                       # none left RUNNING
        assert float(child.data.params["train.noise.sigma0"]) == trial["train.noise.sigma0"]
        val = cl.get_metric_history(child.info.run_id, "val_fid")
        assert [m.step for m in val][:1] == [3] and all(m.value >= 0 for m in val)
        assert len(cl.get_metric_history(child.info.run_id, "loss")) >= 1    # per-step curves
        assert child.data.metrics["val_bits_per_dim"] == pytest.approx(trial["val_bits_per_dim"])

    best = load_config(params_file, overlays=[root / "results" / "micro" / "best.yaml"])
    assert best.train.noise.sigma0 == res["best"]["train.noise.sigma0"]
    with open(root / "results" / "micro" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    # the sigma0 plots and Figure 3 are drawn from these MLflow runs
    from jetformer.experiment_plots import make_plots
    plots = make_plots("microtest", f"sqlite:///{root / 'mlflow.db'}", res["parent_run_id"],
                       root / "results")
    assert [r["sigma0"] for r in plots["rows"]] == [0.0, 4.0] and plots["fid_key"] == "val_fid"
    assert all(f.is_file() for f in plots["files"]) and len(plots["files"]) == 3

    # the second call restored the finished sweep: same Tune experiment and parent, no new runs
    assert again["sweep_id"] == res["sweep_id"] and again["parent_run_id"] == res["parent_run_id"]
    assert len(cl.search_runs(
        [res["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{res['parent_run_id']}'")) == 2


def test_dvc_set_args_reproduce_an_overlay(tmp_path):
    """`dvc exp run -S ...` flags of an overlay give the same config as the overlay itself."""
    import shlex
    from jetformer.tune import dvc_set_args
    for overlays in (["no_factoring"], ["imagenet256", "two_stage"]):
        args = shlex.split(dvc_set_args(overlays, PARAMS))
        sets = [a for a in args if a != "-S"]
        assert len(sets) == len(args) // 2 and sets
        assert load_config(PARAMS, overrides=sets) == load_config(PARAMS, overlays=overlays)
