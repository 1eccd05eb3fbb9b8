"""Experiments: presets and ablation overlays (merging, derived values, clear failures) and the
MLflow comparison table (reads back exactly what was logged)."""
import csv
import math
from pathlib import Path

import pytest
import yaml

from jetformer.config import (
    ABLATIONS_DIR,
    PRESETS_DIR,
    REPO_ROOT,
    ConfigError,
    load_config,
    load_config_dict,
)

PARAMS = REPO_ROOT / "params.yaml"
ABLATIONS = sorted(p.stem for p in ABLATIONS_DIR.glob("*.yaml"))
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
# recipe presets layered over a size preset when both exist (the README's usage)
RECIPES = [("jetformer_b", r) for r in ("imagenet256", "coco_t2i", "coco_ti")]


def _bases():
    bases = [()] + [(p,) for p in PRESETS]
    bases += [pair for pair in RECIPES if all(p in PRESETS for p in pair)]
    return bases


def test_all_table2_rows_exist():
    assert set(ABLATIONS) >= {"no_flow", "no_curriculum", "no_factoring", "two_stage",
                              "learnable_w", "pca", "pca_no_curriculum", "one_mixture",
                              "one_class_token"}
    assert {"imagenet256", "coco_t2i", "coco_ti"} <= set(PRESETS)


@pytest.mark.parametrize("base", _bases(), ids=lambda b: "+".join(b) or "params")
def test_every_ablation_validates_on_every_preset(base):
    """Each Table 2 overlay validates on top of params.yaml and of each preset, and changes
    exactly what its row says, whatever the base's patch size, steps or noise."""
    ref = load_config(PARAMS, overlays=list(base))
    for name in ABLATIONS:
        cfg = load_config(PARAMS, overlays=[*base, name])
        m, t = cfg.model, cfg.train
        if name in ("no_flow", "no_factoring"):
            assert m.factoring == {"no_flow": "no_flow", "no_factoring": "none"}[name]
            assert m.factored_dims == cfg.token_dim == 3 * ref.model.patch_size ** 2
        if name == "two_stage":
            assert t.flow_pretrain_steps == ref.train.steps // 4 > 0
        if name in ("no_curriculum", "pca_no_curriculum"):
            assert t.noise.sigma0 == t.noise.sigma_final == ref.train.noise.sigma_final
        if name in ("pca", "pca_no_curriculum"):
            assert m.factoring == "pca" and cfg.pca.enabled
        if name == "learnable_w":
            assert m.factoring == "learnable_w"
        if name == "one_mixture":
            assert m.num_mixtures == 1
        if name == "one_class_token":
            assert m.num_class_tokens == 1
        # nothing else moves: the overlay touches only its own keys
        changed = {k for k, v in cfg.flat().items() if ref.flat()[k] != v}
        allowed = {"model.factoring", "model.factored_dims", "train.flow_pretrain_steps",
                   "train.noise.sigma0", "pca.enabled", "model.num_mixtures",
                   "model.num_class_tokens"}
        assert changed <= allowed, (name, changed - allowed)


def test_recipe_presets_follow_the_paper():
    inet = load_config(PARAMS, overlays=["imagenet256"])
    assert (inet.data.source, inet.data.resolution, inet.data.flip) == ("imagefolder", 256, True)
    assert ((inet.train.task, inet.model.conditioning, inet.model.num_class_tokens)
            == ("class", "class", 16))
    assert (inet.train.batch_size, inet.train.lr, inet.model.decoder.dropout) == (2048, 1e-3, 0.1)
    assert (inet.train.noise.sigma0, inet.train.noise.sigma_final) == (64.0, 0.0)
    assert inet.num_image_tokens == 256 and inet.model.factored_dims == 128
    for name, task in (("coco_t2i", "t2i"), ("coco_ti", "both")):
        c = load_config(PARAMS, overlays=[name])
        assert (c.data.source, c.train.task, c.model.conditioning) == ("coco", task, "text")
        assert (c.train.noise.sigma0, c.train.noise.sigma_final) == (64.0, 3.0)
        assert c.train.cfg_drop_prob == 0.1 and c.eval.cfg_scale > 0


def test_overlay_merges_deeply_and_later_wins(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"train": {"noise": {"sigma0": 32, "sigma_final": 2}, "lr": 5e-4}}))
    b.write_text(yaml.safe_dump({"train": {"noise": {"sigma0": 8}}}))
    cfg = load_config(PARAMS, overlays=[a, b], overrides=["train.lr=2e-4"])
    assert cfg.train.noise.sigma0 == 8.0          # b over a
    assert cfg.train.noise.sigma_final == 2.0     # a's sibling kept
    assert cfg.train.noise.curriculum_frac == load_config(PARAMS).train.noise.curriculum_frac
    assert cfg.train.lr == pytest.approx(2e-4)    # override over overlays
    assert cfg.train.steps == load_config(PARAMS).train.steps


def test_derived_values_use_the_final_merged_config(tmp_path):
    """The no_factoring overlay follows a patch size set *after* it, and two_stage the steps."""
    bigger_p = tmp_path / "p8.yaml"
    bigger_p.write_text(yaml.safe_dump({"model": {"patch_size": 8}}))
    cfg = load_config(PARAMS, overlays=["no_factoring", bigger_p], overrides=["train.steps=40"])
    assert cfg.model.factored_dims == 3 * 8 * 8
    cfg = load_config(PARAMS, overlays=["two_stage"], overrides=["train.steps=40"])
    assert cfg.train.flow_pretrain_steps == 10
    raw = load_config_dict(PARAMS, overlays=["no_flow"])
    assert raw["model"]["factored_dims"] == 48 and isinstance(raw["model"]["factored_dims"], int)


@pytest.mark.parametrize("content, fragments", [
    ({"train": {"noise": {"sigmo0": 3}}}, ["train.noise.sigmo0"]),                 # unknown key
    ({"modle": {"factoring": "none"}}, ["modle"]),                                 # unknown section
    ({"model": {"factoring": "sideways"}}, ["model.factoring", "sideways"]),       # bad choice
    ({"model": {"factored_dims": "alll"}}, ["model.factored_dims", "alll", "integer"]),
    ({"model": {"factored_dims": "all", "patch_size": "x"}}, ["model.factored_dims", "patch_size"]),
    ({"train": {"steps": "quarter"}}, ["train.steps", "quarter"]),   # a word only where declared
])
def test_invalid_overlay_fails_clearly(tmp_path, content, fragments):
    ov = tmp_path / "bad_overlay.yaml"
    ov.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as e:
        load_config(PARAMS, overlays=[ov])
    for frag in fragments:
        assert frag in str(e.value)


def test_ablation_that_contradicts_its_base_fails_naming_the_key(tmp_path):
    """no_flow on top of a two-stage base is impossible (there is no flow to pretrain)."""
    with pytest.raises(ConfigError, match="flow_pretrain_steps"):
        load_config(PARAMS, overlays=["two_stage", "no_flow"],
                    overrides=["train.flow_pretrain_steps=5"])
    with pytest.raises(ConfigError, match="unknown preset/ablation 'no_flwo'"):
        load_config(PARAMS, overlays=["no_flwo"])


# ----------------------------------------------------------------------------- compare
def _log_runs(uri: str, tmp_path: Path):
    """Three child runs (σ0 = 0, 16, 64) under a parent, plus one unrelated run."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp_id, run_name="sweep", tags={"jetformer.role": "sweep"})
    pid = parent.info.run_id
    logged = {}
    for i, sigma0 in enumerate([0.0, 16.0, 64.0]):
        run = client.create_run(exp_id, run_name=f"trial_{i}", tags={"mlflow.parentRunId": pid})
        rid = run.info.run_id
        client.log_param(rid, "train.noise.sigma0", sigma0)
        client.log_param(rid, "train.noise.sigma_final", 0.0)
        client.log_param(rid, "train.lr", 0.001)                      # same everywhere
        curve = [(s, 5.0 - 0.1 * s - 0.01 * i) for s in range(0, 50, 10)]
        for step, v in curve:
            client.log_metric(rid, "loss", v, step=step)
        fid = 40.0 / (1 + sigma0) + 1.0 / 3.0
        bpd = 4.1 + sigma0 * 1e-3 + 1e-7
        client.log_metric(rid, "fid", fid, step=50)
        client.log_metric(rid, "val_bits_per_dim", bpd, step=50)
        client.set_terminated(rid, "FINISHED")
        logged[f"trial_{i}"] = dict(run_id=rid, sigma0=sigma0, fid=fid, bpd=bpd, loss=curve[-1][1],
                                    curve=curve)
    other = client.create_run(exp_id, run_name="standalone")
    client.log_param(other.info.run_id, "train.noise.sigma0", 32.0)
    client.log_metric(other.info.run_id, "fid", 9.0)
    client.set_terminated(other.info.run_id, "FINISHED")
    return pid, logged


def test_compare_reads_back_exactly_what_was_logged(tmp_path):
    from jetformer.compare import compare, load_runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pid, logged = _log_runs(uri, tmp_path)
    out = tmp_path / "results"
    written = compare("cmp", tracking_uri=uri, parent_run=pid, out_dir=out)

    with open(written["csv"]) as f:
        rows = list(csv.DictReader(f))
    # parent and other excluded
    assert [r["run"] for r in rows] == ["trial_0", "trial_1", "trial_2"]
    for r in rows:
        want = logged[r["run"]]
        assert r["run_id"] == want["run_id"] and r["status"] == "FINISHED"
        assert float(r["train.noise.sigma0"]) == want["sigma0"]
        assert float(r["fid"]) == want["fid"]                      # exact, not rounded
        assert float(r["val_bits_per_dim"]) == want["bpd"]
        assert float(r["loss"]) == want["loss"]
    assert "train.lr" not in rows[0]                                # equal everywhere: not a column
    assert "train.noise.sigma_final" in rows[0]                    # the schedule always is

    md = written["md"].read_text()
    assert md.count("| trial_") == 3 and f"{logged['trial_1']['fid']:.4g}" in md
    for key in ("vs_sigma0", "curves"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = load_runs("cmp", uri, pid)
    assert runs[2].history["loss"] == logged["trial_2"]["curve"]   # full curves, not only the last

    every = compare("cmp", tracking_uri=uri, out_dir=out)           # no parent: all but the sweep
    with open(every["csv"]) as f:
        assert (sorted(r["run"] for r in csv.DictReader(f))
                == ["standalone", "trial_0", "trial_1", "trial_2"])


def test_compare_unknown_experiment_fails_clearly(tmp_path):
    from jetformer.compare import compare
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_runs(uri, tmp_path)
    with pytest.raises(ValueError, match="'nope' not found.*cmp"):
        compare("nope", tracking_uri=uri, out_dir=tmp_path)


# ----------------------------------------------------------------------------- ablate
def test_ablation_rows_configs_and_applicability():
    from jetformer.ablate import ROWS, ablation_config, not_applicable, plan, row_names
    assert row_names()[0] == "baseline" and set(row_names()[1:]) == set(ABLATIONS)
    for base in ([], ["tiny", "class_conditional"], ["table2"]):
        if any(p not in PRESETS for p in base):
            continue
        cfgs = {r.name: ablation_config(r.name, PARAMS, base, seed=1) for r in ROWS}
        assert len({c.train.out_dir for c in cfgs.values()}) == len(ROWS)    # no shared checkpoints
        assert {c.mlflow.experiment for c in cfgs.values()} == {"jetformer-ablations"}
        assert all(c.seed == c.train.seed == 1 for c in cfgs.values())
        assert cfgs["no_flow"].model.factoring == "no_flow"
        assert cfgs["baseline"].model.factoring == "post_flow"
        text = not cfgs["baseline"].model.conditioning == "class"
        assert bool(not_applicable(cfgs["one_class_token"], "one_class_token")) == text
        assert all(not not_applicable(c, n) for n, c in cfgs.items() if n != "one_class_token")
    points = plan(PARAMS, ["table2"], seeds=2)
    assert len(points) == 2 * len(ROWS)                                   # every row, 2 seeds
    assert len({p["hash"] for p in points.values()}) == len(points)       # seeds differ
    assert {p["config"]["data"]["synthetic"]["world"] for p in points.values()} == {"photo"}
    assert all(Path(p["config"]["eval"]["judge_path"]).is_absolute() for p in points.values())
    with pytest.raises(ConfigError, match="unknown ablation"):
        plan(PARAMS, only=["nope"])
    with pytest.raises(ConfigError, match="seeds"):
        plan(PARAMS, seeds=0)


def _seeds(fid, acc=0.9, bpd=3.0, png=4.0, **extra):
    """Per-seed metric dicts: one per value of `fid`."""
    return [{"fid": f, "attribute_accuracy": acc, "attribute_chance": 0.25,
             "val_bits_per_dim": bpd, "png_bits_per_dim": png, **extra} for f in fid]


def test_ablation_verdicts_weigh_the_effect_against_the_spread():
    from jetformer.ablate import table_rows, to_csv, to_markdown
    results = {"baseline": _seeds([10.0, 12.0]),
               "no_flow": _seeds([30.0, 34.0]),                 # far worse: as the paper
               "one_mixture": _seeds([4.0, 5.0]),               # clearly better: contradicted
               "one_class_token": _seeds([11.0, 14.0]),         # within the spread
               "pca": _seeds([400.0, 420.0], acc=0.26),         # samples at chance: broken
               "learnable_w": _seeds([12.0, 13.0], bpd=7.0),    # bits/dim far above PNG
               "no_curriculum": _seeds([15.0])}                 # one seed: no spread
    rows = {r["ablation"]: r for r in table_rows(results)}
    assert rows["baseline"]["verdict"] == "reference"
    assert rows["baseline"]["fid"] == 11.0
    assert rows["baseline"]["fid_std"] == pytest.approx(math.sqrt(2.0))
    assert rows["no_flow"]["verdict"] == "reproduced" and rows["no_flow"]["fid_vs_baseline"] == 21.0
    assert ("+21" in rows["no_flow"]["verdict_text"]
            and "catastrophic" in rows["no_flow"]["verdict_text"])
    assert "standard error" in rows["no_flow"]["verdict_text"]
    assert rows["one_mixture"]["verdict"] == "contradicted"
    assert rows["one_class_token"]["verdict"] == "inconclusive"
    assert "within 2 SE" in rows["one_class_token"]["verdict_text"]
    assert rows["pca"]["verdict"] == "broken" and "chance" in rows["pca"]["verdict_text"]
    assert (rows["learnable_w"]["verdict"] == "broken"
            and "PNG" in rows["learnable_w"]["verdict_text"])
    assert (rows["no_curriculum"]["verdict"] == "inconclusive"
            and rows["no_curriculum"]["seeds"] == 1)
    # a baseline that has not learnt its classes makes every comparison inconclusive
    weak = {"baseline": _seeds([10.0, 12.0], acc=0.5), "no_flow": _seeds([30.0, 34.0], acc=0.5)}
    row = table_rows(weak)[1]
    assert row["verdict"] == "inconclusive" and "0.7" in row["verdict_text"]
    table = list(csv.DictReader(to_csv(list(rows.values())).splitlines()))
    assert (float(table[1]["fid"]) == 32.0
            and float(table[1]["fid_std"]) == pytest.approx(2 * math.sqrt(2)))
    md = to_markdown(list(rows.values()), "# t")
    assert "| no_flow | 2 | 32 ± 2.828 |" in md and "1 reproduced, 1 contradicted" in md


def test_one_mixture_needs_the_recall_drop_the_paper_reports():
    """Paper: 1 mixture gives a mild FID drop *and* a significant recall drop: both must hold
    for "reproduced"; a recall rise contradicts it."""
    from jetformer.ablate import table_rows

    def judged(recall):
        results = {"baseline": _seeds([10.0, 12.0], recall=0.8),
                   "one_mixture": [dict(m, recall=r) for m, r in
                                   zip(_seeds([13.0, 14.0]), recall)]}
        return next(r for r in table_rows(results) if r["ablation"] == "one_mixture")
    assert judged([0.5, 0.52])["verdict"] == "reproduced"
    unclear = judged([0.7, 0.9])                         # FID worse, recall within the spread
    assert unclear["verdict"] == "inconclusive" and "recall" in unclear["verdict_text"]
    assert judged([0.95, 0.97])["verdict"] == "contradicted"


def test_pca_without_curriculum_is_judged_by_the_curriculum_effect_with_and_without_pca():
    """Paper: with PCA the curriculum matters less. pca_no_curriculum is measured against pca,
    and its claim holds when that change is smaller than no_curriculum's against the baseline
    by more than 2 standard errors of the difference."""
    from jetformer.ablate import table_rows

    def judged(pca_nc, no_curriculum=(40.0, 44.0)):
        results = {"baseline": _seeds([10.0, 12.0]), "pca": _seeds([12.0, 14.0]),
                   "pca_no_curriculum": _seeds(pca_nc)}
        if no_curriculum:
            results["no_curriculum"] = _seeds(no_curriculum)
        return next(r for r in table_rows(results) if r["ablation"] == "pca_no_curriculum")
    small = judged([15.0, 17.0])                   # +3 with PCA against +31 without
    assert small["verdict"] == "reproduced", small["verdict_text"]
    assert "vs pca 13" in small["verdict_text"] and "larger by +28" in small["verdict_text"]
    same = judged([42.0, 46.0])                    # +31 with PCA too: the claim fails...
    assert same["verdict"] == "inconclusive", same["verdict_text"]
    larger = judged([80.0, 84.0])                  # ... and much larger: contradicted
    assert larger["verdict"] == "contradicted", larger["verdict_text"]
    better = judged([8.0, 9.0])                    # better than PCA: the direction is wrong
    assert better["verdict"] == "contradicted", better["verdict_text"]
    missing = judged([15.0, 17.0], no_curriculum=None)
    assert missing["verdict"] == "inconclusive" and "no_curriculum" in missing["verdict_text"]


def test_ablation_resume_skips_points_measured_with_the_same_settings(tmp_path):
    """A result file with the point's config hash counts as measured; a changed setting (or a
    corrupt file) makes the point pending again; the table is built from the files."""
    import json

    from jetformer.ablate import collect, plan, read_result, write_tables
    from jetformer.config import load_config as lc
    points = plan(PARAMS, ["tiny", "class_conditional"], only=["no_flow"], seeds=2,
                  out_dir=tmp_path)
    assert set(points) == {"baseline/seed0", "baseline/seed1", "no_flow/seed0", "no_flow/seed1"}
    metrics = {"baseline": [10.0, 12.0], "no_flow": [30.0, 34.0]}
    for key, p in points.items():
        path = Path(p["result"])
        path.parent.mkdir(parents=True, exist_ok=True)
        m = _seeds([metrics[p["row"]][p["seed"]]])[0]
        path.write_text(json.dumps({"row": p["row"], "seed": p["seed"], "config_hash": p["hash"],
                                    "steps": 5, "metrics": m}))
    assert all(read_result(Path(p["result"]))["config_hash"] == p["hash"] for p in points.values())
    got, _ = collect(points)
    assert sorted(m["fid"] for m in got["no_flow"]) == [30.0, 34.0]
    changed = plan(PARAMS, ["tiny", "class_conditional"], sets=["train.steps=7"],
                   only=["no_flow"], seeds=2, out_dir=tmp_path)
    assert collect(changed)[0] == {}                        # other settings: nothing measured
    Path(points["no_flow/seed1"]["result"]).write_text("{not json")
    assert read_result(Path(points["no_flow/seed1"]["result"])) is None
    rows = write_tables(points, lc(points["baseline/seed0"]["config"]), ["tiny"], [], 2, tmp_path)
    assert {r["ablation"]: r["seeds"] for r in rows} == {"baseline": 2, "no_flow": 1}
    assert "| no_flow | 1 | 30 |" in (tmp_path / "ablations.md").read_text()


@pytest.mark.slow
def test_ablate_micro_budget_end_to_end(tmp_path, monkeypatch):
    """Baseline + the pca row, 2 seeds each, at a micro budget: one Ray Tune grid (2 trials at
    a time), train_loop + the evaluation functions per point, the tables, child MLflow runs of
    one parent; a rerun measures nothing again."""
    import ray
    from mlflow.tracking import MlflowClient
    from test_tune import build_micro_project

    from jetformer.ablate import run_ablations
    params = build_micro_project(tmp_path, "train.steps=4", "train.num_workers=1",
                                 "train.checkpoint_every=4", "pca.num_images=20")
    monkeypatch.chdir(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        rows = run_ablations(params, only=["pca"], seeds=2, out_dir=tmp_path / "results")
        t_first = (tmp_path / "results" / "ablations" / "pca" / "seed1.json").stat().st_mtime
        again = run_ablations(params, only=["pca"], seeds=2, out_dir=tmp_path / "results")
    finally:
        ray.shutdown()
    assert [r["ablation"] for r in rows] == ["baseline", "pca"]
    assert all(r["seeds"] == 2 for r in rows)
    for r in rows:
        assert math.isfinite(r["fid"]) and math.isfinite(r["fid_std"])
        assert math.isfinite(r["val_bits_per_dim"]) and math.isfinite(r["val_uncond_bits_per_dim"])
        assert 0.0 <= r["attribute_accuracy"] <= 1.0
    assert rows[1]["verdict"] in ("reproduced", "contradicted", "inconclusive", "broken")
    assert (tmp_path / "results" / "ablations" / "pca" / "seed1.json").stat().st_mtime == t_first
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]
    with open(tmp_path / "results" / "ablations.csv") as f:
        table = {r["ablation"]: r for r in csv.DictReader(f)}
    assert float(table["pca"]["fid"]) == pytest.approx(rows[1]["fid"], rel=1e-3)
    cl = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = cl.get_experiment_by_name("microtest-ablations")
    runs = cl.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("jetformer.role") == "ablations"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {(r.data.tags["jetformer.ablation"], r.data.tags["jetformer.seed"]) for r in children} \
        == {("baseline", "0"), ("baseline", "1"), ("pca", "0"), ("pca", "1")}
    assert all(r.info.status == "FINISHED" and "fid" in r.data.metrics for r in children)
    assert len(cl.get_metric_history(children[0].info.run_id, "loss")) >= 1
    # `compare --ablation-table default` selects exactly this table's parent and rows
    from jetformer.compare import Selection
    picked = cl.search_runs([exp.experiment_id],
                            Selection(ablation_table="default").filter_string())
    assert {r.info.run_id for r in picked} == {r.info.run_id for r in parents + children}
    assert all(r.data.tags["jetformer.role"] == "ablation" for r in children)


# ----------------------------------------------------------------------------- sigma0 plots
def _log_noise_sweep(uri: str):
    """A parent run and 6 finished children (sigma0 0 / 16 / 64 x 2 seeds) with final metrics
    and per-step histories, as a noise sweep logs them; plus one unfinished child."""
    from mlflow.tracking import MlflowClient
    cl = MlflowClient(tracking_uri=uri)
    exp = cl.create_experiment("noise")
    parent = cl.create_run(exp, run_name="sweep-noise-x", tags={"jetformer.role": "sweep"})
    pid = parent.info.run_id
    final = {}
    for s0 in (0.0, 16.0, 64.0):
        for seed in (0, 1):
            run = cl.create_run(exp, run_name=f"s{s0}-{seed}",
                                tags={"mlflow.parentRunId": pid})
            rid = run.info.run_id
            cl.log_param(rid, "train.noise.sigma0", str(s0))
            cl.log_param(rid, "train.seed", str(seed))
            fid = 50.0 - 0.3 * s0 + 0.005 * s0 ** 2 + 2.0 * seed     # a U-curve + seed noise
            bpd = 4.0 + 0.002 * s0 + 0.1 * seed
            for step in (5, 10):
                sigma = s0 * (1 - step / 10)
                cl.log_metric(rid, "bits_per_dim", bpd + sigma / 100, step=step)
                cl.log_metric(rid, "sigma_rgb", sigma, step=step)
                cl.log_metric(rid, "val_fid", fid + (10 - step), step=step)
                cl.log_metric(rid, "val_bits_per_dim", bpd + (10 - step) / 10, step=step)
            cl.set_terminated(rid, "FINISHED")
            final.setdefault(s0, []).append((fid, bpd))
    cl.create_run(exp, run_name="running", tags={"mlflow.parentRunId": pid})   # left out
    return cl, pid, final


def test_sigma0_plots_from_mlflow_runs_with_spread(tmp_path):
    from jetformer.cli import main
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl, pid, final = _log_noise_sweep(uri)
    assert main(["compare", "--experiment", "noise", "--tracking-uri", uri, "--parent-run",
                 pid, "--sigma-plots", "--out-dir", str(tmp_path / "res")]) == 0
    out = tmp_path / "res" / "sweeps" / "sweep-noise-x"
    with open(out / "noise_sigma0.csv") as f:
        rows = {float(r["sigma0"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [0.0, 16.0, 64.0]
    for s0, vals in final.items():
        fids = [v[0] for v in vals]
        assert int(rows[s0]["runs"]) == 2 and int(rows[s0]["fid_n"]) == 2
        assert float(rows[s0]["fid_mean"]) == pytest.approx(sum(fids) / 2)
        assert float(rows[s0]["fid_std"]) == pytest.approx(abs(fids[0] - fids[1]) / math.sqrt(2))
        assert float(rows[s0]["bits_per_dim_mean"]) == pytest.approx(sum(v[1] for v in vals) / 2)
    for png in ("noise_sigma0.png", "figure3.png"):
        assert (out / png).stat().st_size > 5000
    logged = {a.path for a in cl.list_artifacts(pid, "plots")}
    assert logged == {"plots/noise_sigma0.csv", "plots/noise_sigma0.png", "plots/figure3.png"}


def test_sigma0_plots_fail_clearly(tmp_path):
    from jetformer.experiment_plots import make_plots
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, pid, _ = _log_noise_sweep(uri)
    with pytest.raises(ValueError, match="--parent-run"):
        make_plots("noise", uri, "", tmp_path)
    with pytest.raises(ValueError, match="'nope' not found"):
        make_plots("nope", uri, pid, tmp_path)
    with pytest.raises(ValueError, match="no finished child runs"):
        make_plots("noise", uri, "0" * 32, tmp_path)


def test_ablation_point_hash_does_not_depend_on_the_checkout(tmp_path, monkeypatch):
    """Result files measured in one checkout count in another (paths in the hash are relative)."""
    import shutil
    from jetformer.ablate import plan
    here = plan(PARAMS, ["tiny"], only=["no_flow"], seeds=1)
    other = tmp_path / "checkout"
    other.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", other / "dvc.yaml")
    monkeypatch.chdir(other)
    there = plan(PARAMS, ["tiny"], only=["no_flow"], seeds=1)
    assert {k: p["hash"] for k, p in here.items()} == {k: p["hash"] for k, p in there.items()}
    assert here["no_flow/seed0"]["config"] != there["no_flow/seed0"]["config"]   # absolute paths


def test_ablation_point_hash_ignores_tracking_and_parallelism():
    from jetformer.ablate import plan
    a = plan(PARAMS, ["tiny"], only=["no_flow"], seeds=1)
    b = plan(PARAMS, ["tiny"], sets=["tune.max_concurrent_trials=4",
                                     "mlflow.tracking_uri=sqlite:///x.db"],
             only=["no_flow"], seeds=1)
    c = plan(PARAMS, ["tiny"], sets=["train.lr=1e-4"], only=["no_flow"], seeds=1)
    assert a["no_flow/seed0"]["hash"] == b["no_flow/seed0"]["hash"] != c["no_flow/seed0"]["hash"]


def test_ablate_refuses_a_role_that_points_at_another_world(tmp_path, monkeypatch):
    """A role file left by the default world (pointing at its prepared data) must not serve a
    config whose pretraining data is elsewhere: its FID would be measured on the wrong world."""
    from jetformer.ablate import ensure_roles
    from jetformer.data.roles import read_role, write_role
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(PARAMS), overlays=["table2"],
                      overrides=["data.roles.fid.prepared_dir=data/other/fid",
                                 "data.roles.caption.prepared_dir=data/p/caption",
                                 "data.roles.vqa.prepared_dir=data/p/vqa",
                                 "data.roles.zeroshot.prepared_dir=data/p/zeroshot"])
    ensure_roles(cfg)                       # writes the missing role files of this world
    assert read_role("data/p/caption")["data"] == cfg.data.prepared_dir
    write_role("data/other/fid", {"data": "data/prepared/pretrain", "unavailable": ""})
    with pytest.raises(ValueError, match=r"data\.roles\.fid.*data/prepared/pretrain"):
        ensure_roles(cfg)


def test_ablate_report_lists_unmeasured_rows_as_pending_and_runs_nothing(tmp_path):
    """`ablate --report` mid-campaign: measured rows with their numbers, the others pending."""
    import json

    from jetformer.ablate import plan, run_ablations
    points = plan(PARAMS, ["tiny", "class_conditional"], only=["no_flow", "one_mixture"],
                  seeds=1, out_dir=tmp_path)
    for key in ("baseline/seed0", "no_flow/seed0"):
        p = points[key]
        Path(p["result"]).parent.mkdir(parents=True, exist_ok=True)
        Path(p["result"]).write_text(json.dumps({
            "row": p["row"], "seed": 0, "config_hash": p["hash"], "steps": 5,
            "metrics": _seeds([10.0 if p["row"] == "baseline" else 30.0])[0]}))
    rows = run_ablations(PARAMS, ["tiny", "class_conditional"], only=["no_flow", "one_mixture"],
                         seeds=1, out_dir=tmp_path, report_only=True)
    assert {r["ablation"]: r["verdict"] == "pending" for r in rows} == {
        "baseline": False, "no_flow": False, "one_mixture": True}
    text = (tmp_path / "ablations.md").read_text()
    assert "| one_mixture | 0 |" in text and "1 pending" in text
    assert not (tmp_path / "ablations" / "one_mixture").exists()     # nothing was run
