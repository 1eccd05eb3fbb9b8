"""`python -m jetformer ablate --preset table2 [--seeds 2] [--set k=v] [--only NAME] [--fresh]`:
the paper's Table 2 ablations, each row trained with several seeds and evaluated like the
pipeline's own model, with a verdict per row.

* A point is (row, seed): the base config (params + presets + --set) with the row's overlay
  from `experiments/ablations/` (the baseline has none) and `seed = train.seed = k`.
* Points run in parallel as one Ray Tune grid (FIFO, no early stopping; at most
  `tune.max_concurrent_trials` at once, `tune.cpus_per_trial` each). Tune rather than queued
  DVC experiments: a DVC experiment reruns the whole pipeline per row (its evaluation stages
  included) in its own workspace copy, serially unless the queue gets its own workers, and knows
  nothing of seeds or of Ray; the Tune grid reuses the sweep machinery, puts every point in the
  same Ray cluster and logs each as a child MLflow run of one parent.
* Each trial calls the pipeline's `train_loop` (world size 1) and the evaluation's functions
  (samples with CFG for the first `eval.num_samples` val labels/captions; FID / precision /
  recall / KID through the domain judge on the shapes worlds; the judge's attribute accuracy of
  the samples; held-out val bits/dim given the class and unconditional), then writes
  `<out>/ablations/<row>/seed<k>.json` atomically with the point's config hash.
* Resume row by row: a point whose result file holds the same config hash is not run again
  (`--fresh` reruns all). Rerun the command after an interruption; finished points are kept.
* Verdicts (`verdict`): a variant that fails a sanity check the baseline passes is `broken`;
  with a baseline that has not learnt its conditioning every row is `inconclusive`; else the
  FID change against the baseline is compared with its standard error over the seeds:
  `inconclusive` within 2 SE, else `reproduced` / `contradicted` by the paper's direction, and
  the text states the effect, the spread and the paper's wording. `pca_no_curriculum` is
  measured against `pca`, and its claim is an interaction: the curriculum's FID change with
  PCA is smaller than without (`no_curriculum` against the baseline) by more than 2 SE.
  `one_mixture` also needs the recall drop the paper reports (beyond 2 SE; a rise contradicts).

Writes `experiments/results/ablations.md` and `.csv` (mean, std and seeds per metric).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from jetformer.config import ABLATIONS_DIR, Config, ConfigError, deep_merge, load_config
from jetformer.runs import csv_text, dict_rows, init_ray, markdown_table, md_cell

ABLATION_EXPERIMENT_SUFFIX = "-ablations"
# sanity checks and verdict thresholds
CHANCE_MARGIN = 0.10       # attribute accuracy below chance + this = "at chance"
MIN_BASELINE_ACCURACY = 0.7  # the baseline must have learnt its conditioning (issue 16)
PNG_FACTOR = 1.5           # bits/dim above PNG x this = "far above PNG"
SIGNIFICANCE = 2.0         # |effect| must exceed this many standard errors
UNHASHED = ("mlflow", "tune")  # where runs are logged and how many at once: not the result


@dataclass(frozen=True)
class Row:
    name: str
    what: str               # Table 2 row
    paper: str              # the paper's wording (ImageNet 256, class-conditional, 100 epochs)
    fid_worse: bool | None  # the paper's direction for FID against the baseline (None: reference)
    size: str = ""          # the paper's magnitude: catastrophic | large | moderate | slight
    versus: str = "baseline"  # the row whose FID the change is measured against
    smaller_than: tuple[str, str] | None = None   # the paper: this change is smaller than the
    #                                               FID of row [0] minus row [1]'s
    drops: tuple[str, ...] = ()   # other metrics the paper says fall (e.g. recall)


ROWS = (
    Row("baseline", "JetFormer: post-flow factoring, noise curriculum, K mixtures", "reference",
        None),
    Row("no_flow", "no normalizing flow (raw patches)", "catastrophic loss of quality", True,
        "catastrophic"),
    Row("no_curriculum", "no RGB noise curriculum", "much worse FID", True, "large"),
    Row("no_factoring", "no factoring (all 3p² dims modelled)", "quality loss", True,
        "moderate"),
    Row("two_stage", "flow pretrained alone, then frozen", "lower sample quality", True,
        "moderate"),
    Row("learnable_w", "factoring with a learnable W before the flow",
        "underperforms post-flow factoring", True, "moderate"),
    Row("pca", "PCA factoring (frozen W from PCA)", "somewhat worse", True, "moderate"),
    Row("pca_no_curriculum", "PCA factoring, no noise curriculum",
        "worse than PCA, but the curriculum matters less than without PCA", True, "moderate",
        versus="pca", smaller_than=("no_curriculum", "baseline")),
    Row("one_mixture", "1 GMM component", "relatively mild drop, significant recall drop", True,
        "slight", drops=("recall",)),
    Row("one_class_token", "1 class token instead of 16", "slight performance drop", True,
        "slight"),
)
# the relative FID change each wording of the paper allows (lower, upper bound)
SIZES = {"catastrophic": (1.0, math.inf), "large": (0.3, math.inf), "moderate": (0.0, 1.0),
         "slight": (0.0, 0.3)}
METRICS = ("fid", "precision", "recall", "kid", "attribute_accuracy", "val_bits_per_dim",
           "val_uncond_bits_per_dim")


def row_names() -> list[str]:
    names = [r.name for r in ROWS]
    missing = [n for n in names[1:] if not (ABLATIONS_DIR / f"{n}.yaml").is_file()]
    if missing:
        raise ConfigError(f"ablation overlays missing from {ABLATIONS_DIR}: {missing}")
    return names


def ablation_config(name: str, params="params.yaml", presets=(), sets=(), seed: int = 0
                    ) -> Config:
    """Base + the row's overlay + the seed, with its own checkpoint dir, PCA file and run name."""
    base = load_config(params, overlays=list(presets), overrides=list(sets))
    extra = [f"seed={seed}", f"train.seed={seed}",
             f"train.out_dir=models/ablations/{name}/seed{seed}",
             f"mlflow.run_name=ablation-{name}-seed{seed}",
             f"mlflow.experiment={base.mlflow.experiment}{ABLATION_EXPERIMENT_SUFFIX}",
             # the ablations' own PCA: the fit_pca stage's output stays DVC's
             (f"pca.out_path=models/ablations/pca_{base.hash(('data',), 6)}"
              f"_p{base.model.patch_size}.pt")]
    overlays = list(presets) + ([] if name == "baseline" else [name])
    return load_config(params, overlays=overlays, overrides=list(sets) + extra)


def not_applicable(cfg: Config, name: str) -> str:
    """Why a row cannot run on this base ("" when it can)."""
    if name == "one_class_token" and cfg.model.conditioning != "class":
        return ("class tokens exist only in class-conditional models "
                "(add --preset class_conditional)")
    return ""


def judge_file(cfg: Config) -> Path:
    from jetformer.eval.judge import judge_path
    return Path(judge_path(cfg))


def ensure_inputs(cfg: Config) -> None:
    """The data and judge the rows need: prepared (and the judge trained with the judge stage's
    function) when missing for a synthetic world; other sources must have run their stages."""
    from jetformer.eval.fidelity import resolve_extractor
    prepared = Path(cfg.data.prepared_dir) / "metadata.json"
    if not prepared.is_file():
        if cfg.data.source != "synthetic":
            raise FileNotFoundError(f"prepared data not found in {cfg.data.prepared_dir} "
                                    "(run `dvc repro prepare`)")
        from jetformer.data.prepare import prepare
        print(f"ablate: preparing the {cfg.data.synthetic.world} world -> "
              f"{cfg.data.prepared_dir}", flush=True)
        prepare(cfg)
    ensure_roles(cfg)
    if cfg.model.conditioning == "text" and not Path(cfg.tokenizer.out_path).is_file():
        raise FileNotFoundError(f"tokenizer not found: {cfg.tokenizer.out_path} "
                                "(run `dvc repro tokenizer`)")
    if resolve_extractor(cfg.eval.feature_extractor, cfg.data.source) == "domain" \
            and not judge_file(cfg).is_file():
        if cfg.data.source != "synthetic":
            raise FileNotFoundError(f"judge weights not found: {judge_file(cfg)} "
                                    "(run `dvc repro judge`)")
        from jetformer.eval.stages import run_judge
        out = judge_file(cfg)
        print(f"ablate: training the judge -> {out}", flush=True)
        run_judge(cfg, out=out, metrics=out.with_suffix(".json"))


def ensure_roles(cfg: Config) -> None:
    """Each evaluation role's `role.json` (`prepare@<role>`), written when missing for a
    synthetic world; a role fed by the pretraining data must point at *this* config's
    `data.prepared_dir`, or its FID would be measured against another world."""
    from jetformer.config import ROLES, role_prepared_dir, role_source
    from jetformer.data.roles import ROLE_FILE, read_role
    from jetformer.data.stages import run_prepare
    for role in (r for r in ROLES if r != "pretrain"):
        out = Path(role_prepared_dir(cfg.data, role))
        if not (out / ROLE_FILE).is_file() and not (out / "metadata.json").is_file():
            if cfg.data.source != "synthetic":
                raise FileNotFoundError(f"{out}: no prepared data for data.roles.{role} "
                                        f"(run `dvc repro prepare@{role}`)")
            run_prepare(cfg, role, metrics=out.parent / f"prepare_{role}.json")
        info = read_role(out)
        fed_by_pretraining = role_source(cfg.data, role) == cfg.data.source
        if fed_by_pretraining and info.get("data") not in (".", None) \
                and Path(info["data"]).resolve() != Path(cfg.data.prepared_dir).resolve():
            raise ValueError(
                f"{out / ROLE_FILE}: data.roles.{role} points at {info['data']}, not at this "
                f"config's data.prepared_dir ({cfg.data.prepared_dir}): set "
                f"data.roles.{role}.prepared_dir to a directory of this world's own")


def ensure_pca(cfg: Config) -> None:
    """Fit the PCA the pca rows need with the fit_pca stage's functions, once per data/patch."""
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
    """Sample quality of a trained model, measured by the `sample` + `evaluate_generation`
    stages' functions: samples with CFG (eval.cfg_scale, eval.temperature) for the first
    eval.num_samples val captions (text models) or labels (class models); FID / precision /
    recall / KID against all val images; attribute accuracy = mean fraction of the asked
    attributes (caption: main shape and colour; class: shape) that the judge sees in the
    sample. Also the chance level of that accuracy (`attribute_chance`: 1 / number of values
    of each asked attribute)."""
    from jetformer.data.dataset import ArrowImageDataset
    from jetformer.eval.attributes import class_asked, t2i_asked
    from jetformer.eval.fidelity import resolve_extractor
    from jetformer.eval.judge import load_judge
    from jetformer.eval.stages import (generate_samples, judged_attributes, sample_fidelity,
                                       text_tokenizer, visible)
    from jetformer.train.checkpoint import load_trained

    model, mcfg = load_trained(checkpoint)
    e = cfg.eval
    val = ArrowImageDataset(cfg.data.prepared_dir, "val")
    n = min(e.num_samples, len(val))
    items = [val[i] for i in range(n)]
    kind = "class" if mcfg.model.conditioning == "class" else "t2i"
    tokenizer = text_tokenizer(mcfg, cfg) if kind == "t2i" else None
    fake, _ = generate_samples(model, mcfg, tokenizer, items, kind, e=e, seed=cfg.seed)
    extractor = resolve_extractor(e.feature_extractor, cfg.data.source)
    jp = str(judge_file(cfg)) if extractor == "domain" else None
    out = sample_fidelity(fake, val.images(), extractor, jp, cfg)
    out.pop("kid_std", None)
    out["attribute_accuracy"] = out["attribute_chance"] = float("nan")
    if jp is not None:
        judge = load_judge(jp)
        if kind == "class":   # in the judge's terms: the shape, else the label
            asked = [class_asked(int(it["label"]), val.classes, judge.vocab) for it in items]
        else:
            asked = [t2i_asked(it["attributes"]) for it in items]
        asked = visible(asked, judge.vocab)
        out["attribute_accuracy"] = judged_attributes(judge, fake, asked)[0]
        heads = [h for a in asked for h in a]
        if heads:
            out["attribute_chance"] = sum(1.0 / len(judge.vocab[h]) for h in heads) / len(heads)
    out["num_samples"] = n
    return out


def heldout_nll(cfg: Config, checkpoint: str | Path) -> dict:
    """Val bits/dim given the class (`val_bits_per_dim`) and unconditional
    (`val_uncond_bits_per_dim`) on `eval.num_nll_images` val images, and PNG's on the same,
    by the `evaluate_understanding` stage's function."""
    from jetformer.data.dataset import ArrowImageDataset
    from jetformer.eval import stages
    from jetformer.train.checkpoint import load_trained
    model, mcfg = load_trained(checkpoint)
    val = ArrowImageDataset(cfg.data.prepared_dir, "val")
    n = min(cfg.eval.num_nll_images or len(val), len(val))
    tokenizer = stages.text_tokenizer(mcfg, cfg) if model.conditioning == "text" else None
    nll = stages.heldout_nll(model, mcfg, val, n, tokenizer, batch_size=cfg.eval.batch_size,
                             seed=cfg.seed)
    return {f"val_{k}" if k != "png_bits_per_dim" else k: v.mean().item()
            for k, v in nll.items()}


# ----------------------------------------------------------------------------- one point
def point_key(name: str, seed: int) -> str:
    return f"{name}/seed{seed}"


def result_path(out_dir: str | Path, name: str, seed: int) -> Path:
    return Path(out_dir) / "ablations" / name / f"seed{seed}.json"


def read_result(path: Path) -> dict | None:
    """A point's result file, or None when missing or unreadable (then it is run again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_point(config: dict, ctx: dict) -> None:
    """One Tune trial = one (row, seed): train, evaluate, log the child run, write the result."""
    import torch

    from jetformer.train import checkpoint as ckpt
    from jetformer.train import tracking
    from jetformer.train.checkpoint import atomic_write_bytes
    from jetformer.train.launch import CSV_COLUMNS
    from jetformer.train.loop import train_loop

    os.chdir(ctx["cwd"])
    torch.set_num_threads(max(1, int(ctx["cpus_per_trial"])))
    point = ctx["points"][config["point"]]
    cfg = load_config(point["config"])
    t0 = time.time()
    run_id = _child_run(cfg, ctx, point)
    out_dir = Path(cfg.train.out_dir)

    def progress(row: dict) -> None:
        if "event" not in row:
            tracking.log_metrics(cfg, run_id, {k: v for k, v in row.items()
                                               if k in CSV_COLUMNS and k != "step"},
                                 int(row["step"]))
        elif row["event"] == "val":
            tracking.log_metrics(cfg, run_id, {k: v for k, v in row.items()
                                               if k.startswith("val_")}, int(row["step"]))

    def reporter(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None and metrics.get("done"):
            ckpt.export_model(ckpt.load_state(checkpoint_dir), out_dir)

    try:
        final = train_loop(cfg, rank=0, world_size=1, reporter=reporter, progress=progress)
        metrics = {**evaluate_generation(cfg, out_dir), **heldout_nll(cfg, out_dir)}
        metrics["train_val_bits_per_dim"] = final.get("val_bits_per_dim")
        tracking.log_metrics(cfg, run_id, metrics, int(final["step"]))
    except BaseException:
        tracking.end_run(cfg, run_id, "FAILED")
        raise
    result = {"row": point["row"], "seed": point["seed"], "config_hash": point["hash"],
              "steps": int(final["step"]), "run_id": run_id, "metrics": metrics,
              "wall_time_s": round(time.time() - t0, 1)}
    atomic_write_bytes(Path(point["result"]),
                       (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
    tracking.end_run(cfg, run_id, "FINISHED")
    from ray import tune
    tune.report({k: v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)})


def _child_run(cfg: Config, ctx: dict, point: dict) -> str:
    """The point's MLflow run, a child of the table's parent run (`parent_run_id` tag)."""
    from mlflow.entities import Param, RunTag

    from jetformer.train import tracking
    cl = tracking.client(cfg)
    tags = {"mlflow.parentRunId": ctx["parent_run_id"], "mlflow.runName": cfg.mlflow.run_name,
            tracking.TAG_ABLATION: point["row"], tracking.TAG_SEED: str(point["seed"]),
            tracking.TAG_ABLATION_TABLE: ctx["table"],
            **tracking.run_tags(cfg, point["hash"])}
    run = cl.create_run(ctx["experiment_id"], run_name=cfg.mlflow.run_name,
                        tags={k: str(v) for k, v in tags.items()})
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
              for k, v in sorted(cfg.flat().items())]
    for i in range(0, len(params), 100):
        cl.log_batch(run.info.run_id, params=params[i:i + 100])
    cl.log_batch(run.info.run_id, tags=[RunTag(tracking.TAG_ROLE, tracking.ROLE_ABLATION)])
    return run.info.run_id


# ----------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std (n - 1; NaN for one value), n) of the finite values."""
    v = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, s, len(v)


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """{row: {metric: (mean, std, n)}, ...} from each row's per-seed metric dicts."""
    keys = (*METRICS, "png_bits_per_dim", "attribute_chance")
    return {row: {k: mean_std([r.get(k) for r in runs]) for k in keys}
            for row, runs in results.items()}


def sanity_failures(stats: dict, base: dict) -> list[str]:
    """Sanity checks a variant fails while the baseline passes them."""
    out = []
    chance = stats["attribute_chance"][0]
    acc, bacc = stats["attribute_accuracy"][0], base["attribute_accuracy"][0]
    if math.isfinite(chance) and math.isfinite(acc) and math.isfinite(bacc) \
            and acc < chance + CHANCE_MARGIN <= bacc:
        out.append(f"sample attribute accuracy {acc:.3f} is at chance ({chance:.3f}) while the "
                   f"baseline's is {bacc:.3f}")
    png = stats["png_bits_per_dim"][0]
    bpd, bbpd = stats["val_bits_per_dim"][0], base["val_bits_per_dim"][0]
    if math.isfinite(png) and math.isfinite(bpd) and math.isfinite(bbpd) \
            and bpd > PNG_FACTOR * png >= bbpd:
        out.append(f"val bits/dim {bpd:.3f} is far above PNG's {png:.3f} (> {PNG_FACTOR}x) while "
                   f"the baseline's is {bbpd:.3f}")
    return out


def _change(stats: dict, ref: dict, key: str = "fid") -> tuple[float, float, float, int, int]:
    """(change of `key`, its relative size, its standard error, seeds, reference seeds)."""
    (m, s, n), (bm, bs, bn) = stats[key], ref[key]
    effect = m - bm
    se = math.sqrt(s ** 2 / n + bs ** 2 / bn) if n >= 2 and bn >= 2 else math.nan
    return effect, effect / bm if bm else math.nan, se, n, bn


def verdict(row: Row, stats: dict, base: dict, every: dict | None = None) -> tuple[str, str]:
    """(verdict, text) of one row: its FID change against `row.versus` (the baseline unless
    said otherwise; `every` holds each row's stats), and for a `smaller_than` claim the
    difference of the two changes (module docstring)."""
    if row.fid_worse is None:
        return "reference", ""
    bacc = base["attribute_accuracy"][0]
    broken = sanity_failures(stats, base)
    if broken:
        return "broken", "; ".join(broken) + ": not a reproduction, whatever its FID"
    if not (math.isfinite(bacc) and bacc >= MIN_BASELINE_ACCURACY):
        return "inconclusive", (f"the baseline's class-prompt attribute accuracy {bacc:.3f} < "
                                f"{MIN_BASELINE_ACCURACY}: it has not learnt its conditioning at "
                                "this budget (raise train.steps)")
    every = every or {"baseline": base}
    needed = [row.versus, *(row.smaller_than or ())]
    if any(r not in every for r in needed):
        return "inconclusive", f"needs the rows {needed} measured first"
    ref = every[row.versus]
    m, bm = stats["fid"][0], ref["fid"][0]
    if not (math.isfinite(m) and math.isfinite(bm)):
        return "inconclusive", "FID missing"
    effect, rel, se, n, bn = _change(stats, ref)
    if not math.isfinite(se):
        return "inconclusive", (f"FID {effect:+.3g} ({rel:+.0%}) vs {row.versus} with "
                                f"{n}+{bn} seeds: no spread to judge it by (use --seeds >= 2)")
    ratio = abs(effect) / se if se > 0 else math.inf
    text = (f"FID {m:.3g} vs {row.versus} {bm:.3g}: {effect:+.3g} ({rel:+.0%}), {ratio:.1f}x "
            f"its standard error {se:.3g} ({n}+{bn} seeds); paper: \"{row.paper}\"")
    wrong_way = ratio > SIGNIFICANCE and (effect > 0) != row.fid_worse
    if row.smaller_than:
        return _smaller_than_verdict(row, effect, se, every, text, wrong_way)
    if ratio <= SIGNIFICANCE:
        return "inconclusive", text + f" (within {SIGNIFICANCE:g} SE)"
    drops, drops_text = _drops(row, stats, ref)
    text += drops_text
    if wrong_way or drops == "rises":
        return "contradicted", text
    if drops == "unclear":
        return "inconclusive", text + f" (the {', '.join(row.drops)} change is within "\
                                      f"{SIGNIFICANCE:g} SE)"
    lo, hi = SIZES.get(row.size, (-math.inf, math.inf))
    if math.isfinite(rel) and not lo <= rel <= hi:
        text += (f"; the size differs from the paper's wording ({row.size}: "
                 f"{lo:+.0%}..{hi:+.0%})")
    return "reproduced", text


def _drops(row: Row, stats: dict, ref: dict) -> tuple[str, str]:
    """Whether each of `row.drops` falls against `ref` beyond 2 SE ("falls"), rises beyond it
    ("rises", which wins), or neither ("unclear"); and the changes as text."""
    state, text = "falls", ""
    for key in row.drops:
        change, rel, se, n, bn = _change(stats, ref, key)
        ratio = abs(change) / se if se > 0 else math.inf
        text += (f"; {key} {change:+.3g} ({rel:+.0%}), {ratio:.1f}x its standard error "
                 f"{se:.3g}")
        if not (math.isfinite(ratio) and ratio > SIGNIFICANCE):
            state = "unclear" if state == "falls" else state
        elif change > 0:
            state = "rises"
    return state, text


def _smaller_than_verdict(row: Row, effect: float, se: float, every: dict, text: str,
                          wrong_way: bool) -> tuple[str, str]:
    """The paper's claim that this row's FID change (`effect` ± `se`) is smaller than row
    a's against row b's (`row.smaller_than`), e.g. the curriculum matters less with PCA:
    reproduced when the difference exceeds 2 SE, contradicted when the change itself goes
    the wrong way or is larger by 2 SE."""
    a, b = row.smaller_than
    other, _, other_se, _, _ = _change(every[a], every[b])
    gap, gap_se = other - effect, math.sqrt(se ** 2 + other_se ** 2)
    if not math.isfinite(gap_se):
        return "inconclusive", text + f"; {a} vs {b} has no spread to judge the claim by"
    text += (f"; the same change without it ({a} vs {b}): {other:+.3g}, larger by {gap:+.3g}, "
             f"{abs(gap) / gap_se:.1f}x the standard error {gap_se:.3g} of the difference")
    if wrong_way or gap < -SIGNIFICANCE * gap_se:
        return "contradicted", text
    if gap > SIGNIFICANCE * gap_se:
        return "reproduced", text
    return "inconclusive", text + f" (within {SIGNIFICANCE:g} SE)"


def table_rows(results: dict[str, list[dict]], planned: tuple[str, ...] = ()) -> list[dict]:
    """One row per ablation with mean/std/n per metric, the FID change and the verdict; a
    `planned` row without any measured seed is listed as *pending*."""
    stats = summarise(results)
    base = stats.get("baseline")
    rows = []
    for r in ROWS:
        if r.name not in stats:
            if r.name in planned:
                rows.append({"ablation": r.name, "what": r.what, "seeds": 0, "paper": r.paper,
                             "verdict": "pending", "verdict_text": "not measured yet"})
            continue
        st = stats[r.name]
        row = {"ablation": r.name, "what": r.what, "seeds": st["fid"][2] or
               max(v[2] for v in st.values())}
        for k in METRICS:
            row[k], row[f"{k}_std"] = st[k][0], st[k][1]
        row["png_bits_per_dim"] = st["png_bits_per_dim"][0]
        row["fid_vs_baseline"] = (st["fid"][0] - base["fid"][0]) if base and r.fid_worse \
            is not None else None
        row["paper"] = r.paper
        row["verdict"], row["verdict_text"] = verdict(r, st, base, stats) if base else \
            ("n/a", "")
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    return csv_text(*dict_rows(rows, list(rows[0]) if rows else ["ablation"]))


def to_markdown(rows: list[dict], header: str) -> str:
    shown = ("fid", "precision", "recall", "attribute_accuracy", "val_bits_per_dim",
             "val_uncond_bits_per_dim")
    cols = ["ablation", "seeds", *shown, "verdict"]

    def cell(r, c):
        if c in shown:
            m, s = md_cell(r.get(c)), md_cell(r.get(f"{c}_std"))
            return m + (f" ± {s}" if s else "")
        return r.get(c)
    lines = [header, ""] + markdown_table(cols, [[cell(r, c) for c in cols] for r in rows])
    lines += ["", "Mean ± sample standard deviation over the seeds. Verdicts:", ""]
    lines += [f"- `{r['ablation']}` **{r['verdict']}**: {r['verdict_text']}"
              for r in rows if r.get("verdict_text")]
    counts = {v: sum(r["verdict"] == v for r in rows)
              for v in ("reproduced", "contradicted", "inconclusive", "broken", "pending")}
    lines += ["", "Summary: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver
def plan(params="params.yaml", presets=(), sets=(), only=(), seeds: int = 2,
         out_dir="experiments/results") -> dict[str, dict]:
    """{point key: {row, seed, config (dict, absolute paths), hash, result}} for every point
    (n/a rows left out), validated before anything runs."""
    from jetformer.train.launch import absolute_paths
    from jetformer.train.tracking import project_root
    names = row_names()
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ConfigError(f"unknown ablation(s) {unknown}; known: {names}")
    if seeds < 1:
        raise ConfigError(f"ablate: --seeds must be >= 1, got {seeds}")
    todo = [n for n in names if not only or n in only or n == "baseline"]
    root = project_root()
    points = {}
    for name in todo:
        for seed in range(seeds):
            cfg = ablation_config(name, params, presets, sets, seed)
            if not_applicable(cfg, name):
                continue
            d = absolute_paths(cfg, root).to_dict()
            d["eval"]["judge_path"] = str(judge_file(cfg))        # absolute, for the trials
            load_config(d)
            points[point_key(name, seed)] = {   # hash of the relative paths: any checkout
                "row": name, "seed": seed, "config": d, "hash": settings_hash(cfg),
                "result": str(result_path(out_dir, name, seed).resolve())}
    return points


def settings_hash(cfg: Config) -> str:
    """What makes a measurement: every section but UNHASHED."""
    return cfg.hash(tuple(k for k in cfg.to_dict() if k not in UNHASHED))


def table_name(presets=()) -> str:
    """The table's name in MLflow (tag `jetformer.ablation_table`, `compare --ablation-table`):
    the presets beneath the rows, e.g. "table2", or "default"."""
    return "+".join(Path(str(p)).stem for p in presets) or "default"


def _parent_run(cfg: Config, base_hash: str, storage: Path, table: str) -> dict:
    """The table's parent MLflow run, one per base config (reopened by a rerun)."""
    from jetformer.train import tracking
    from jetformer.train.checkpoint import atomic_write_bytes
    cl = tracking.client(cfg)
    exp_id = tracking.experiment_id(cl, cfg)
    state_file = storage / f"ablations-{base_hash}.mlflow.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        try:
            if cl.get_run(state["parent_run_id"]).info.lifecycle_stage == "active":
                cl.update_run(state["parent_run_id"], status="RUNNING")
                return state
        except Exception as e:  # noqa: BLE001 - deleted, or another store: a new parent
            print(f"ablate: parent run {state.get('parent_run_id')} not reusable ({e})")
    run = cl.create_run(exp_id, run_name=f"ablations-{base_hash}",
                        tags={tracking.TAG_ROLE: "ablations", tracking.TAG_ABLATION_TABLE: table,
                              **tracking.run_tags(cfg, base_hash)})
    state = {"parent_run_id": run.info.run_id, "experiment_id": exp_id, "table": table}
    atomic_write_bytes(state_file, json.dumps(state, indent=2).encode())
    return state


def run_ablations(params="params.yaml", presets=(), sets=(), only=(), seeds: int = 2,
                  fresh: bool = False, out_dir="experiments/results",
                  report_only: bool = False) -> list[dict]:
    """Run every (row, seed) not measured yet with the same settings, then write the tables;
    returns the table rows. `report_only`: write the tables from the points measured so far
    (the others *pending*) and run nothing, e.g. while a campaign is under way."""
    points = plan(params, presets, sets, only, seeds, out_dir)
    base_cfg = load_config(next(p["config"] for p in points.values() if p["row"] == "baseline"))
    if report_only:
        return write_tables(points, base_cfg, presets, sets, seeds, out_dir)
    ensure_inputs(base_cfg)
    for p in points.values():
        cfg = load_config(p["config"])
        if cfg.model.factoring == "pca":
            ensure_pca(cfg)
    pending = [k for k, p in points.items() if fresh or (read_result(Path(p["result"])) or {})
               .get("config_hash") != p["hash"]]
    print(f"ablate: {len(points)} points ({len(points) - len(pending)} already measured with "
          f"the same settings), {len(pending)} to run", flush=True)
    base_hash = load_config(deep_merge(base_cfg.to_dict(), {"seed": 0, "train": {"seed": 0}})
                            ).hash()
    storage = Path(base_cfg.tune.storage_dir).resolve()
    state = {"table": table_name(presets), **_parent_run(base_cfg, base_hash, storage,
                                                           table_name(presets))}
    if pending:
        _fit(base_cfg, points, pending, state, storage, base_hash)
    rows = write_tables(points, base_cfg, presets, sets, seeds, out_dir, state)
    return rows


def _fit(cfg: Config, points: dict, pending: list[str], state: dict, storage: Path,
         base_hash: str) -> None:
    from ray import tune

    ctx = {"cwd": os.getcwd(), "cpus_per_trial": cfg.tune.cpus_per_trial,
           "points": {k: points[k] for k in pending}, **state}
    resources = {"cpu": cfg.tune.cpus_per_trial}
    if cfg.tune.gpus_per_trial:
        resources["gpu"] = cfg.tune.gpus_per_trial
    started = init_ray(cfg.train.ray_address)
    try:
        trainable = tune.with_resources(tune.with_parameters(run_point, ctx=ctx), resources)
        tuner = tune.Tuner(
            trainable, param_space={"point": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.tune.max_concurrent_trials,
                                        trial_name_creator=lambda t: t.config["point"]
                                        .replace("/", "-"),
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=f"ablations-{base_hash}-{int(time.time())}",
                                      storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        results = tuner.fit()
    finally:
        if started:
            import ray
            ray.shutdown()
    errors = [r for r in results if r.error]
    for r in errors:
        print(f"ablate: {r.config.get('point')} failed: {str(r.error).splitlines()[0]}",
              flush=True)


def collect(points: dict) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """({row: [metrics of each measured seed]}, {row: [result dicts]}) of points whose result
    matches their current settings."""
    metrics, full = {}, {}
    for p in points.values():
        res = read_result(Path(p["result"]))
        if res and res.get("config_hash") == p["hash"]:
            metrics.setdefault(p["row"], []).append(res["metrics"])
            full.setdefault(p["row"], []).append(res)
    return metrics, full


def write_tables(points: dict, base: Config, presets, sets, seeds: int, out_dir,
                 state: dict | None = None) -> list[dict]:
    """ablations.md / .csv from the result files (and to the parent MLflow run)."""
    from jetformer.train.checkpoint import atomic_write_bytes
    metrics, full = collect(points)
    rows = table_rows(metrics, tuple(dict.fromkeys(p["row"] for p in points.values())))
    steps = sorted({r["steps"] for rs in full.values() for r in rs})
    wall = sum(r.get("wall_time_s", 0) for rs in full.values() for r in rs)
    t = base.train
    header = (f"# Table 2 ablations at the `{'+'.join(presets) or 'params.yaml'}` scale\n\n"
              f"Base: {t.steps} updates (measured: {steps}) at batch {t.batch_size}, "
              f"{base.data.resolution} px, `{base.data.source}` data"
              + (f" (`{base.data.synthetic.world}` world)" if base.data.source == "synthetic"
                 else "")
              + f", task `{t.task}`, σ0 {t.noise.sigma0} → {t.noise.sigma_final}; "
              f"{seeds} seed(s) per row (seed = train.seed = 0..{seeds - 1}); "
              f"{base.eval.num_samples} samples per run (CFG {base.eval.cfg_scale}, temperature "
              f"{base.eval.temperature}); extra settings: {list(sets) or 'none'}; "
              f"{wall / 3600:.1f} CPU-trial hours in all. The paper's rows are ImageNet 256 px, "
              f"100 epochs (Table 2). MLflow experiment `{base.mlflow.experiment}`"
              + (f", parent run `{state['parent_run_id']}`" if state else "") + ".\n\n"
              f"Sanity checks: a variant is *broken* when its samples' attribute accuracy is "
              f"below chance + {CHANCE_MARGIN} while the baseline's is not, or its bits/dim "
              f"exceed {PNG_FACTOR}x PNG's while the baseline's do not. Verdicts need the "
              f"baseline's attribute accuracy >= {MIN_BASELINE_ACCURACY} and an FID change "
              f"beyond {SIGNIFICANCE:g} standard errors.")
    out = Path(out_dir)
    atomic_write_bytes(out / "ablations.csv", to_csv(rows).encode())
    atomic_write_bytes(out / "ablations.md", to_markdown(rows, header).encode())
    if state is not None:
        from jetformer.train import tracking
        for f in ("ablations.csv", "ablations.md"):
            tracking.log_artifact(base, state["parent_run_id"], out / f)
        tracking.end_run(base, state["parent_run_id"])
    return rows


def cli_ablate(args) -> int:
    rows = run_ablations(args.params, args.preset, args.set, args.only,
                         getattr(args, "seeds", 2), getattr(args, "fresh", False), args.out_dir,
                         getattr(args, "report", False))
    for r in rows:
        print(f"{r['ablation']:18s} seeds {r['seeds']} fid {md_cell(r.get('fid'))} ± "
              f"{md_cell(r.get('fid_std'))} bpd {md_cell(r.get('val_bits_per_dim'))} -> "
              f"{r['verdict']}")
    print(f"table: {Path(args.out_dir) / 'ablations.md'}")
    return 0
