"""`python -m jetformer compare --experiment NAME`: a table and plots of the MLflow runs of an
experiment (a sweep's trials with `--parent-run`, the ablations, or any runs logged there).

Writes, under `--out-dir`:
  compare_<name>.csv   every run: name, id, status, the params that differ between runs (and the
                       noise schedule), and the last value of every metric, exactly as logged
  compare_<name>.md    the same table, rounded for reading
  compare_<name>_vs_sigma0.png   FID and bits/dim against the initial RGB noise sigma0 (paper Fig. 3/§4.2)
  compare_<name>_curves.png      training curves of all runs overlaid
The same runs can be compared in the MLflow UI (`mlflow ui --backend-store-uri <tracking uri>`,
select the runs, "Compare").
"""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


SIGMA0 = "train.noise.sigma0"
# params always shown (when logged) even if equal across runs: the swept noise schedule
KEY_PARAMS = (SIGMA0, "train.noise.sigma_final", "train.noise.curriculum_frac")
# which metric plays "FID" and which "bits/dim" in the sigma0 plot: first one present wins
FID_KEYS = ("fid", "domain_fid", "val_domain_fid")
BPD_KEYS = ("val_bits_per_dim", "val_bpd", "bits_per_dim", "image_bpd", "train_bits_per_dim")
CURVE_PRIORITY = ("loss", "image_bpd", "bits_per_dim", "train_bits_per_dim", "val_bits_per_dim",
                  "domain_fid", "sigma", "text_nll", "grad_norm", "lr")
MAX_CURVES = 6
SWEEP_ROLE_TAG = "jetformer.role"   # "sweep" on a sweep's parent run (left out of tables)


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]                       # last logged value
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def default_tracking_uri() -> str:
    """The pipeline's own rule (`jetformer.train.tracking.tracking_uri`): `mlflow.tracking_uri`
    of ./params.yaml, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    from jetformer.config import Config, load_config
    from jetformer.train.tracking import tracking_uri
    cfg = load_config("params.yaml") if Path("params.yaml").is_file() else Config()
    return tracking_uri(cfg)


def load_runs(experiment: str, tracking_uri: str, parent_run: str = "",
              curve_keys: tuple[str, ...] | None = None) -> list[RunRecord]:
    """All runs of `experiment` (only children of `parent_run` when given), oldest first,
    with the full history of the metrics worth plotting."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"MLflow experiment {experiment!r} not found at {tracking_uri} "
                         f"(experiments there: {names})")
    filt = f"tags.mlflow.parentRunId = '{parent_run}'" if parent_run else ""
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=filt, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    records = []
    for r in runs:
        if r.data.tags.get(SWEEP_ROLE_TAG) == "sweep":
            continue
        rec = RunRecord(run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8],
                        status=r.info.status, params=dict(r.data.params),
                        metrics=dict(r.data.metrics))
        keys = curve_keys if curve_keys is not None else tuple(rec.metrics)
        for key in keys:
            if key in rec.metrics:
                hist = client.get_metric_history(rec.run_id, key)
                rec.history[key] = sorted((m.step, m.value) for m in hist)
        records.append(rec)
    if not records:
        where = f"children of run {parent_run}" if parent_run else "runs"
        raise ValueError(f"no {where} in MLflow experiment {experiment!r} at {tracking_uri}")
    return records


# ----------------------------------------------------------------------------- table
def table_columns(runs: list[RunRecord]) -> tuple[list[str], list[str]]:
    """(param columns, metric columns): params that differ between runs plus the noise
    schedule; every metric that any run logged."""
    all_params = sorted({k for r in runs for k in r.params})
    varying = [k for k in all_params if len({r.params.get(k) for r in runs}) > 1]
    params = [k for k in KEY_PARAMS if k in all_params] + [k for k in varying if k not in KEY_PARAMS]
    metrics = sorted({k for r in runs for k in r.metrics})
    return params, metrics


def comparison_rows(runs: list[RunRecord]) -> tuple[list[str], list[list]]:
    params, metrics = table_columns(runs)
    header = ["run", "run_id", "status"] + params + metrics
    rows = [[r.name, r.run_id, r.status] + [r.params.get(k, "") for k in params]
            + [r.metrics.get(k, "") for k in metrics] for r in runs]
    return header, rows


def to_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([repr(v) if isinstance(v, float) else v for v in row])  # exact floats
    return buf.getvalue()


def to_markdown(header: list[str], rows: list[list], title: str = "") -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return str(v).replace("|", "\\|")
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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
    _save_fig(fig, path)
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
    _save_fig(fig, path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- output
def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _save_fig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def compare(experiment: str, tracking_uri: str = "", parent_run: str = "",
            out_dir: str | Path = "experiments/results") -> dict[str, Path]:
    """Read the runs, write the table (CSV + markdown) and plots; returns the written paths."""
    uri = tracking_uri or default_tracking_uri()
    runs = load_runs(experiment, uri, parent_run)
    stem = "compare_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in experiment)
    if parent_run:
        stem += f"_{parent_run[:8]}"
    out = Path(out_dir)
    header, rows = comparison_rows(runs)
    written = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    atomic_write_text(written["csv"], to_csv(header, rows))
    title = f"MLflow experiment `{experiment}`" + (f", children of run `{parent_run}`" if parent_run else "")
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
    written = compare(args.experiment, args.tracking_uri, args.parent_run, args.out_dir)
    for kind, path in written.items():
        print(f"{kind:10s} {path}")
    return 0
