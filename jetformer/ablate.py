"""`python -m jetformer ablate --preset tiny [--set train.steps=N] [--only NAME]`: the paper's
Table 2 ablations, each trained and evaluated like the pipeline's own model.

Every row is the base config (params + presets + --set) with one overlay from
`experiments/ablations/` (the baseline has none). Each is trained by the pipeline's
`run_training` (Ray Train, MLflow run `ablation-<name>` in the experiment `<mlflow.experiment>-
ablations`, checkpoint under `models/ablations/<name>/`) and evaluated by the evaluation's own
functions: samples with CFG for the first `eval.num_samples` val classes/captions, FID /
precision / recall / KID against as many val images through torch-fidelity (the domain judge on
the shapes world), the judge's attribute accuracy of the samples, and held-out val bits/dim.
A finished row is not trained again when the command is rerun (run_training resumes/reuses).

Writes `experiments/results/ablations.md` and `.csv`: the measured metrics, the change against
the baseline, the paper's direction for that row and whether this run shows it.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

from jetformer.config import ABLATIONS_DIR, Config, ConfigError, load_config

ABLATION_EXPERIMENT_SUFFIX = "-ablations"


@dataclass(frozen=True)
class Row:
    name: str
    what: str             # Table 2 row
    paper: str            # the paper's finding (ImageNet 256, class-conditional, 100 epochs)
    fid_worse: bool | None  # the paper's direction for FID against the baseline (None: reference)


ROWS = (
    Row("baseline", "JetFormer: post-flow factoring, noise curriculum, K mixtures", "reference", None),
    Row("no_flow", "no normalizing flow (raw patches)", "catastrophic loss of quality", True),
    Row("no_curriculum", "no RGB noise curriculum", "much worse FID", True),
    Row("no_factoring", "no factoring (all 3p² dims modelled)", "worse FID", True),
    Row("two_stage", "flow pretrained alone, then frozen", "lower sample quality", True),
    Row("learnable_w", "factoring with a learnable W before the flow", "worse than post-flow factoring", True),
    Row("pca", "PCA factoring (frozen W from PCA)", "somewhat worse FID", True),
    Row("pca_no_curriculum", "PCA factoring, no noise curriculum",
        "worse than PCA, but the curriculum matters less than without PCA", True),
    Row("one_mixture", "1 GMM component", "mild FID drop, significant recall drop", True),
    Row("one_class_token", "1 class token instead of 16", "slight FID drop", True),
)
METRICS = ("fid", "precision", "recall", "kid", "attribute_accuracy", "val_bits_per_dim")


def row_names() -> list[str]:
    names = [r.name for r in ROWS]
    missing = [n for n in names[1:] if not (ABLATIONS_DIR / f"{n}.yaml").is_file()]
    if missing:
        raise ConfigError(f"ablation overlays missing from {ABLATIONS_DIR}: {missing}")
    return names


def ablation_config(name: str, params="params.yaml", presets=(), sets=()) -> Config:
    """Base + the row's overlay, with its own checkpoint dir, PCA file and MLflow run name."""
    base = load_config(params, overlays=list(presets), overrides=list(sets))
    extra = [f"train.out_dir=models/ablations/{name}", f"mlflow.run_name=ablation-{name}",
             f"mlflow.experiment={base.mlflow.experiment}{ABLATION_EXPERIMENT_SUFFIX}",
             # the ablations' own PCA: the fit_pca stage's output stays DVC's
             f"pca.out_path=models/ablations/pca_p{base.model.patch_size}.pt"]
    overlays = list(presets) + ([] if name == "baseline" else [name])
    return load_config(params, overlays=overlays, overrides=list(sets) + extra)


def not_applicable(cfg: Config, name: str) -> str:
    """Why a row cannot run on this base ("" when it can)."""
    if name == "one_class_token" and cfg.model.conditioning != "class":
        return "class tokens exist only in class-conditional models (add --preset class_conditional)"
    return ""


def check_inputs(cfg: Config) -> None:
    """Fail before any training when a stage the rows need has not run."""
    from jetformer.eval.fidelity import resolve_extractor
    from jetformer.tune import judge_path
    if not (Path(cfg.data.prepared_dir) / "metadata.json").is_file():
        raise FileNotFoundError(f"prepared data not found in {cfg.data.prepared_dir} (run `dvc repro prepare`)")
    if cfg.model.conditioning == "text" and not Path(cfg.tokenizer.out_path).is_file():
        raise FileNotFoundError(f"tokenizer not found: {cfg.tokenizer.out_path} (run `dvc repro tokenizer`)")
    if resolve_extractor(cfg.eval.feature_extractor, cfg.data.source) == "domain" \
            and not Path(judge_path(cfg)).is_file():
        raise FileNotFoundError(f"judge weights not found: {judge_path(cfg)} (run `dvc repro judge`)")


def ensure_pca(cfg: Config) -> None:
    """Fit the PCA the pca rows need with the fit_pca stage's functions, once per patch size."""
    from jetformer.data.pca import save_pca
    from jetformer.data.stages import fit_train_pca
    out = Path(cfg.pca.out_path)
    if out.is_file():
        return
    pca, n = fit_train_pca(cfg)
    save_pca(pca, out)
    print(f"ablate: fitted PCA on {n} training images -> {out}", flush=True)


# ----------------------------------------------------------------------------- evaluation
def evaluate_generation(cfg: Config, checkpoint: str | Path) -> dict:
    """Sample quality of a trained model measured as the `sample` + `evaluate_generation` stages
    do: samples with CFG (eval.cfg_scale, eval.temperature) for the first eval.num_samples val
    captions (text models) or labels (class models); FID / precision / recall / KID against all
    val images; attribute accuracy = mean fraction of the asked attributes (caption: main
    shape and colour; class: shape) that the judge sees in the sample."""
    import torch
    from jetformer.data.dataset import ArrowImageDataset
    from jetformer.eval.attributes import attribute_accuracy, class_asked, t2i_asked
    from jetformer.eval.fidelity import fidelity_metrics, resolve_extractor
    from jetformer.eval.judge import load_judge
    from jetformer.eval.sampling import caption_prompts, sample_from_labels, sample_from_text
    from jetformer.train.checkpoint import load_trained
    from jetformer.tune import judge_path

    model, mcfg = load_trained(checkpoint)
    e = cfg.eval
    val = ArrowImageDataset(cfg.data.prepared_dir, "val")
    n = min(e.num_samples, len(val))
    items = [val[i] for i in range(n)]
    common = dict(cfg_scale=e.cfg_scale, temperature=e.temperature, batch_size=e.batch_size, seed=cfg.seed)
    if mcfg.model.conditioning == "class":
        fake = sample_from_labels(model, [int(it["label"]) for it in items], **common)
    else:
        from jetformer.data.tokenizer import TextTokenizer
        fake = sample_from_text(model, TextTokenizer(mcfg.tokenizer.out_path), caption_prompts(items, cfg.seed),
                                max_text_len=mcfg.tokenizer.max_text_len, **common)
    extractor = resolve_extractor(e.feature_extractor, cfg.data.source)
    jp = judge_path(cfg) if extractor == "domain" else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = fidelity_metrics(fake, val.images(), extractor=extractor, judge_path=jp,
                           inception_weights=e.inception_weights, batch_size=e.batch_size,
                           device=device, seed=cfg.seed)
    out.pop("kid_std", None)
    out["attribute_accuracy"] = float("nan")
    if jp is not None:
        pred = load_judge(jp).predict(fake)
        if mcfg.model.conditioning == "class":   # in the judge's terms: the shape, else the label
            asked = [class_asked(int(it["label"]), val.classes, pred) for it in items]
        else:
            asked = [t2i_asked(it["attributes"]) for it in items]
        # only what the judge can see (a source without scene attributes has no shape/colour heads)
        acc, _ = attribute_accuracy(pred, [a if all(h in pred for h in a) else {} for a in asked])
        out["attribute_accuracy"] = acc
    out["num_samples"] = n
    return out


# ----------------------------------------------------------------------------- the table
def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per ablation: metrics, FID change against the baseline, the paper's direction
    and whether this run shows it."""
    base = results.get("baseline", {})
    rows = []
    for r in ROWS:
        res = results.get(r.name)
        if res is None:
            continue
        row = {"ablation": r.name, "what": r.what, "status": res.get("status", ""),
               "steps": res.get("steps"), **{m: res.get(m) for m in METRICS},
               "paper": r.paper}
        fid, bfid = res.get("fid"), base.get("fid")
        if r.fid_worse is None or not _finite(fid) or not _finite(bfid):
            row["fid_vs_baseline"], row["paper_direction_reproduced"] = None, "n/a"
        else:
            row["fid_vs_baseline"] = fid - bfid
            row["paper_direction_reproduced"] = "yes" if (fid > bfid) == r.fid_worse else "no"
        row["wall_time_s"] = res.get("wall_time_s")
        row["note"] = res.get("note", "")
        rows.append(row)
    return rows


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = list(rows[0]) if rows else ["ablation"]
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def to_markdown(rows: list[dict], header: str) -> str:
    cols = ["ablation", "status", "steps", *METRICS, "fid_vs_baseline", "paper", "paper_direction_reproduced"]
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    notes = [f"- `{r['ablation']}`: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    done = [r for r in rows if r["paper_direction_reproduced"] in ("yes", "no")]
    if done:
        yes = sum(r["paper_direction_reproduced"] == "yes" for r in done)
        lines += ["", f"The paper's FID direction shows in {yes} of {len(done)} rows at this scale. "
                  "One seed per row and a few hundred samples: differences of a few FID points are "
                  "within run-to-run noise, so a 'no' (or a 'yes') here is weak evidence either way."]
    return "\n".join(lines) + "\n"


def run_ablations(params="params.yaml", presets=(), sets=(), only=(), out_dir="experiments/results") -> list[dict]:
    """Run the baseline and the ablations (`only` a subset), write the tables; returns the rows."""
    names = row_names()
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ConfigError(f"unknown ablation(s) {unknown}; known: {names}")
    todo = [n for n in names if not only or n in only or n == "baseline"]
    cfgs = {n: ablation_config(n, params, presets, sets) for n in todo}   # all validate first
    check_inputs(cfgs["baseline"])
    out = Path(out_dir)
    results: dict[str, dict] = {}
    base = cfgs["baseline"]
    started = _init_ray(base)      # one Ray for all rows (run_training reuses it)
    try:
        for name in todo:
            _run_row(name, cfgs[name], results, out)
            _write_table(results, base, presets, sets, out)
    finally:
        if started:
            import ray
            ray.shutdown()
    return table_rows(results)


def _init_ray(cfg: Config) -> bool:
    import logging
    import os
    import ray
    if ray.is_initialized():
        return False
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address=address, include_dashboard=False if address is None else None,
             log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    return True


def _run_row(name: str, cfg: Config, results: dict, out: Path) -> None:
    """Train (pipeline's run_training) and evaluate one row; record its metrics in `results`."""
    from jetformer.train import tracking
    from jetformer.train.launch import run_training
    why = not_applicable(cfg, name)
    if why:
        results[name] = {"status": "n/a", "note": why}
        return
    print(f"ablate: {name} ({cfg.train.steps} steps)", flush=True)
    t0 = time.time()
    if cfg.model.factoring == "pca":
        ensure_pca(cfg)
    run_dir = out / "ablations" / name
    train = run_training(cfg, metrics_path=run_dir / "train.json", curves_path=run_dir / "train.csv",
                         samples_dir=run_dir / "samples")
    ev = evaluate_generation(cfg, train["checkpoint"])
    tracking.log_metrics(cfg, train["run_id"], ev, train["steps"])
    results[name] = {"status": "done", "steps": train["steps"],
                     "val_bits_per_dim": train["val_bits_per_dim"], **ev,
                     "wall_time_s": round(time.time() - t0, 1), "run_id": train["run_id"]}


def _write_table(results: dict, base: Config, presets, sets, out: Path) -> None:
    """ablations.md / .csv, rewritten after every row so a long run shows its progress."""
    from jetformer.compare import atomic_write_text
    rows = table_rows(results)
    header = (f"# Table 2 ablations at the `{'+'.join(presets) or 'params.yaml'}` scale\n\n"
              f"Base: {base.train.steps} steps at batch {base.train.batch_size}, "
              f"{base.data.resolution}px, task `{base.train.task}`, σ0 {base.train.noise.sigma0} → "
              f"{base.train.noise.sigma_final}; {base.eval.num_samples} samples per row (CFG "
              f"{base.eval.cfg_scale}, temperature {base.eval.temperature}); extra settings: "
              f"{list(sets) or 'none'}. The paper's rows are ImageNet 256 px, 100 epochs "
              f"(Table 2); this is a {base.train.steps}-step run on the `{base.data.source}` data. "
              f"MLflow experiment `{base.mlflow.experiment}`.")
    atomic_write_text(out / "ablations.csv", to_csv(rows))
    atomic_write_text(out / "ablations.md", to_markdown(rows, header))


def cli_ablate(args) -> int:
    rows = run_ablations(args.params, args.preset, args.set, args.only, args.out_dir)
    for r in rows:
        print(f"{r['ablation']:18s} {r['status']:5s} fid {r.get('fid')} bpd {r.get('val_bits_per_dim')} "
              f"paper: {r['paper']} -> reproduced: {r['paper_direction_reproduced']}")
    print(f"table: {Path(args.out_dir) / 'ablations.md'}")
    return 0
