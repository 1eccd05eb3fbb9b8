"""`python -m jetformer compare --experiment NAME [selection]`: a table and plots of MLflow runs,
read with `mlflow.search_runs`. The selection narrows the runs of the experiment by the tags
every run carries (`jetformer.train.tracking`):

  --dvc-exp NAME        the runs of one `dvc exp run` experiment (its training and evaluation)
  --sweep NAME          a Ray Tune sweep's trials        --parent-run ID   children of a run
  --ablation-table NAME an ablation table's rows        --role ROLE       train | eval | trial ...

A sweep's parent run is never a row. Writes, under `--out-dir`:
  compare_<name>.csv   every run: name, id, status, the params that differ between runs (and the
                       noise schedule), and the last value of every metric, exactly as logged
  compare_<name>.md    the same table, rounded for reading
  compare_<name>_vs_sigma0.png   FID and bits/dim against the initial RGB noise sigma0
                                 (paper Fig. 3/§4.2)
  compare_<name>_curves.png      training curves of all runs overlaid
The same runs can be compared in the MLflow UI (`mlflow ui --backend-store-uri <tracking uri>`,
select the runs, "Compare").
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from jetformer.runs import csv_text, markdown_table
from jetformer.safe_io import atomic_save_figure, atomic_write_text
from jetformer.train.tracking import (
    ROLE_SWEEP,
    TAG_ABLATION_TABLE,
    TAG_DVC_EXP,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP,
)

SIGMA0 = "train.noise.sigma0"
# params always shown (when logged) even if equal across runs: the swept noise schedule
KEY_PARAMS = (SIGMA0, "train.noise.sigma_final", "train.noise.curriculum_frac")
# which metric plays "FID" and which "bits/dim" in the sigma0 plot: first one present wins
FID_KEYS = ("fid", "domain_fid", "val_domain_fid")
BPD_KEYS = ("val_bits_per_dim", "val_bpd", "bits_per_dim", "image_bpd", "train_bits_per_dim")
CURVE_PRIORITY = ("loss", "image_bpd", "bits_per_dim", "train_bits_per_dim", "val_bits_per_dim",
                  "domain_fid", "sigma", "text_nll", "grad_norm", "lr")
MAX_CURVES = 6


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]                       # last logged value
    tags: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """Which runs of the experiment to compare (empty fields select everything)."""
    parent_run: str = ""
    dvc_exp: str = ""
    sweep: str = ""
    ablation_table: str = ""
    role: str = ""

    def filter_string(self) -> str:
        """The MLflow search filter, e.g. "tags.`dvc.exp_name` = 'exp-1'"."""
        def q(v: str) -> str:
            return v.replace("'", "\\'")
        parts = [f"tags.`{tag}` = '{q(value)}'" for tag, value in (
            (TAG_PARENT, self.parent_run), (TAG_DVC_EXP, self.dvc_exp), (TAG_SWEEP, self.sweep),
            (TAG_ABLATION_TABLE, self.ablation_table), (TAG_ROLE, self.role)) if value]
        return " and ".join(parts)

    def label(self) -> str:
        """Short text for file names and titles ("" for everything)."""
        return "_".join(f"{k}-{v[:8] if k == 'parent_run' else v}" for k, v in (
            ("parent_run", self.parent_run), ("dvc_exp", self.dvc_exp), ("sweep", self.sweep),
            ("ablation_table", self.ablation_table), ("role", self.role)) if v)


def default_tracking_uri() -> str:
    """The pipeline's own rule (`jetformer.train.tracking.tracking_uri`): `mlflow.tracking_uri`
    of ./params.yaml, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    from jetformer.config import load_config
    from jetformer.train.tracking import tracking_uri
    cfg = load_config("params.yaml" if Path("params.yaml").is_file() else None)
    return tracking_uri(cfg)


@contextlib.contextmanager
def _tracking(uri: str):
    """mlflow's fluent API (`search_runs`) pointed at `uri` for the block."""
    import mlflow
    old = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(old)


def _columns(row: dict, prefix: str) -> dict:
    """The logged `prefix*` cells of one `search_runs` row (NaN / None = not logged)."""
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)
            and v is not None and not (isinstance(v, float) and math.isnan(v))}


def _records(frame) -> list[RunRecord]:
    """`mlflow.search_runs` DataFrame -> records."""
    out = []
    for row in frame.to_dict("records"):
        tags = _columns(row, "tags.")
        out.append(RunRecord(
            run_id=row["run_id"], name=tags.get("mlflow.runName") or row["run_id"][:8],
            status=row["status"], params={k: str(v) for k, v in _columns(row, "params.").items()},
            metrics={k: float(v) for k, v in _columns(row, "metrics.").items()}, tags=tags))
    return out


def load_runs(experiment: str, tracking_uri: str, parent_run: str = "",
              curve_keys: tuple[str, ...] | None = None,
              selection: Selection | None = None) -> list[RunRecord]:
    """The selected runs of `experiment` (`parent_run` is shorthand for
    `Selection(parent_run=...)`), oldest first, with the full history of the metrics worth
    plotting; a sweep's parent run is left out."""
    from mlflow.tracking import MlflowClient
    selection = selection or Selection(parent_run=parent_run)
    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"MLflow experiment {experiment!r} not found at {tracking_uri} "
                         f"(experiments there: {names})")
    with _tracking(tracking_uri) as mlflow:
        frame = mlflow.search_runs(experiment_names=[experiment],
                                   filter_string=selection.filter_string(),
                                   order_by=["attributes.start_time ASC"], max_results=100_000)
    records = [r for r in _records(frame) if r.tags.get(TAG_ROLE) != ROLE_SWEEP]
    for rec in records:
        keys = curve_keys if curve_keys is not None else tuple(rec.metrics)
        for key in keys:
            if key in rec.metrics:
                hist = client.get_metric_history(rec.run_id, key)
                rec.history[key] = sorted((m.step, m.value) for m in hist)
    if not records:
        where = f"runs matching {selection.filter_string()!r}" if selection.label() else "runs"
        raise ValueError(f"no {where} in MLflow experiment {experiment!r} at {tracking_uri}")
    return records


# ----------------------------------------------------------------------------- table
def table_columns(runs: list[RunRecord]) -> tuple[list[str], list[str]]:
    """(param columns, metric columns): params that differ between runs plus the noise
    schedule; every metric that any run logged."""
    all_params = sorted({k for r in runs for k in r.params})
    varying = [k for k in all_params if len({r.params.get(k) for r in runs}) > 1]
    params = [k for k in KEY_PARAMS if k in all_params] + [k for k in varying
                                                           if k not in KEY_PARAMS]
    metrics = sorted({k for r in runs for k in r.metrics})
    return params, metrics


def comparison_rows(runs: list[RunRecord]) -> tuple[list[str], list[list]]:
    params, metrics = table_columns(runs)
    header = ["run", "run_id", "status"] + params + metrics
    rows = [[r.name, r.run_id, r.status] + [r.params.get(k, "") for k in params]
            + [r.metrics.get(k, "") for k in metrics] for r in runs]
    return header, rows


def to_csv(header: list[str], rows: list[list]) -> str:
    return csv_text(header, rows)


def to_markdown(header: list[str], rows: list[list], title: str = "") -> str:
    lines = [f"# {title}", ""] if title else []
    return "\n".join(lines + markdown_table(header, rows)) + "\n"


# ----------------------------------------------------------------------------- plots
def _first_present(runs: list[RunRecord], keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if any(k in r.metrics for r in runs):
            return k
    return None


def _as_float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot_vs_sigma0(runs: list[RunRecord], path: Path) -> bool:
    """FID and bits/dim against sigma0 (one point per run). False when nothing to plot."""
    fid_key, bpd_key = _first_present(runs, FID_KEYS), _first_present(runs, BPD_KEYS)
    keys = [k for k in (fid_key, bpd_key) if k]
    pts = [(s, r) for r in runs if (s := _as_float(r.params.get(SIGMA0))) is not None]
    if not keys or not pts:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xy = sorted((s, r.metrics[key]) for s, r in pts if key in r.metrics)
        ax.plot([x for x, _ in xy], [y for _, y in xy], "o-")
        ax.set_xlabel("initial RGB noise σ0 (pixels)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(runs: list[RunRecord], path: Path) -> bool:
    """Training curves of every run overlaid, one panel per metric."""
    keys = [k for k in CURVE_PRIORITY if any(len(r.history.get(k, ())) > 1 for r in runs)]
    keys += sorted({k for r in runs for k, h in r.history.items() if len(h) > 1} - set(keys))
    keys = keys[:MAX_CURVES]
    if not keys:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for r in runs:
            h = r.history.get(key, [])
            if h:
                sigma = r.params.get(SIGMA0)
                label = r.name + (f" (σ0={sigma})" if sigma is not None else "")
                ax.plot([s for s, _ in h], [v for _, v in h], label=label, lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- output
def compare(experiment: str, tracking_uri: str = "", parent_run: str = "",
            out_dir: str | Path = "experiments/results",
            selection: Selection | None = None) -> dict[str, Path]:
    """Read the selected runs, write the table (CSV + markdown) and plots; returns the written
    paths."""
    uri = tracking_uri or default_tracking_uri()
    selection = selection or Selection(parent_run=parent_run)
    runs = load_runs(experiment, uri, selection=selection)
    stem = "compare_" + "".join(c if c.isalnum() or c in "-_" else "_"
                                for c in "_".join(filter(None, (experiment, selection.label()))))
    out = Path(out_dir)
    header, rows = comparison_rows(runs)
    written = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    atomic_write_text(written["csv"], to_csv(header, rows))
    title = f"MLflow experiment `{experiment}`" + (f", runs with {selection.filter_string()}"
                                                   if selection.label() else "")
    atomic_write_text(written["md"], to_markdown(header, rows, title))
    if plot_vs_sigma0(runs, out / f"{stem}_vs_sigma0.png"):
        written["vs_sigma0"] = out / f"{stem}_vs_sigma0.png"
    if plot_curves(runs, out / f"{stem}_curves.png"):
        written["curves"] = out / f"{stem}_curves.png"
    return written


def cli_compare(args) -> int:
    if getattr(args, "sigma_plots", False):   # sigma0 curve + Figure 3 of a noise sweep
        from jetformer.experiment_plots import make_plots
        res = make_plots(args.experiment, args.tracking_uri or default_tracking_uri(),
                         args.parent_run, args.out_dir)
        for path in res["files"]:
            print(f"{'sigma0':10s} {path}")
    selection = Selection(parent_run=args.parent_run, dvc_exp=getattr(args, "dvc_exp", ""),
                          sweep=getattr(args, "sweep", ""),
                          ablation_table=getattr(args, "ablation_table", ""),
                          role=getattr(args, "role", ""))
    written = compare(args.experiment, args.tracking_uri, out_dir=args.out_dir,
                      selection=selection)
    for kind, path in written.items():
        print(f"{kind:10s} {path}")
    return 0
