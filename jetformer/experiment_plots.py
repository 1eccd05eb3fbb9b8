"""The sigma0 curve and Figure 3 from the MLflow runs of a noise sweep (paper §4 "Effect of the
noise curriculum": FID against sigma0, a U-curve with no curriculum far worse; Fig. 3: NLL and
FID over training with and without the curriculum).

`python -m jetformer compare --experiment E --parent-run P --sigma-plots` (or `make_plots`)
reads the finished child runs of the sweep's parent run P with `mlflow.search_runs` and writes,
under `<out_dir>/sweeps/<parent run name>/` and as artifacts of P (`plots/`):

  noise_sigma0.csv   per sigma0: seeds, mean and sample std of the final FID and bits/dim
  noise_sigma0.png   FID and bits/dim against sigma0, error bars = std over the seeds
  figure3.png        (a) training bits/dim over updates with the RGB noise sigma on a second
                     axis, (b) val FID over updates; no curriculum (sigma0 = 0) against the
                     largest sigma0; lines = mean over seeds, bands = min..max
"""
from __future__ import annotations

import math
from pathlib import Path

from jetformer.runs import csv_text, dict_rows
from jetformer.safe_io import atomic_save_figure

SIGMA0 = "train.noise.sigma0"
FID_KEYS = ("fid", "val_fid")              # an evaluation's FID when logged, else the sweep's
BPD_KEYS = ("val_bits_per_dim",)


def search_runs(experiment: str, tracking_uri: str, parent_run: str):
    """Finished child runs of `parent_run` in `experiment` (pandas DataFrame)."""
    import mlflow
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            raise ValueError(f"MLflow experiment {experiment!r} not found at {tracking_uri}")
        df = mlflow.search_runs(experiment_names=[experiment], output_format="pandas",
                                filter_string=f"tags.mlflow.parentRunId = '{parent_run}' and "
                                              "attributes.status = 'FINISHED'")
    finally:
        mlflow.set_tracking_uri(previous)
    if df.empty:
        raise ValueError(f"no finished child runs of parent run {parent_run!r} in experiment "
                         f"{experiment!r}")
    if f"params.{SIGMA0}" not in df:
        raise ValueError(f"the runs of parent {parent_run!r} have no param {SIGMA0!r}: not a "
                         "noise sweep")
    return df


def _first_metric(df, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if f"metrics.{k}" in df and df[f"metrics.{k}"].notna().any():
            return k
    return None


def _mean_std(values) -> tuple[float, float, int]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, s, len(v)


def sigma0_rows(df) -> tuple[list[dict], str | None, str | None]:
    """Per sigma0 (ascending): seeds and mean/std of the final FID and bits/dim."""
    fid, bpd = _first_metric(df, FID_KEYS), _first_metric(df, BPD_KEYS)
    sig = df[f"params.{SIGMA0}"].astype(float)
    rows = []
    for s in sorted(set(sig)):
        part = df[sig == s]
        row = {"sigma0": s, "runs": len(part)}
        for name, key in (("fid", fid), ("bits_per_dim", bpd)):
            m, sd, n = _mean_std(part[f"metrics.{key}"] if key else [])
            row.update({f"{name}_mean": m, f"{name}_std": sd, f"{name}_n": n})
        rows.append(row)
    return rows, fid, bpd


def rows_csv(rows: list[dict]) -> str:
    return csv_text(*dict_rows(rows, list(rows[0])))


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    try:
        atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_sigma0(rows: list[dict], fid: str | None, bpd: str | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = [r["sigma0"] for r in rows]
    for ax, name, key in ((axes[0], "fid", fid), (axes[1], "bits_per_dim", bpd)):
        y = [r[f"{name}_mean"] for r in rows]
        err = [0.0 if not math.isfinite(r[f"{name}_std"]) else r[f"{name}_std"] for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4)
        ax.set_xlabel("initial RGB noise σ0 (pixel units)")
        ax.set_ylabel(key or name)
        ax.grid(alpha=0.3)
    n = max((r["fid_n"] for r in rows), default=0)
    fig.suptitle(f"noise curriculum: final {fid} and {bpd} vs σ0 (mean ± std, up to {n} seeds)")
    _save(fig, path)


def _histories(client, run_ids: list[str], key: str) -> list[dict[int, float]]:
    return [{m.step: m.value for m in client.get_metric_history(r, key)} for r in run_ids]


def _band(hists: list[dict[int, float]]):
    """Steps present in every history; mean, min and max over the histories at each."""
    steps = sorted(set.intersection(*(set(h) for h in hists))) if hists else []
    vals = [[h[s] for h in hists] for s in steps]
    return (steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals],
            [max(v) for v in vals])


def plot_figure3(client, df, path: Path, bpd_key: str = "bits_per_dim") -> tuple[float, float]:
    """Figure 3 at this scale: no curriculum (the smallest sigma0, 0 in the sweep) against the
    largest sigma0. Returns the two sigma0 values compared."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sig = df[f"params.{SIGMA0}"].astype(float)
    lo, hi = float(sig.min()), float(sig.max())
    if lo == hi:
        raise ValueError(f"Figure 3 needs two sigma0 values, the runs all have {lo}")
    fid_key = "val_fid"
    fig, (ax_b, ax_f) = plt.subplots(1, 2, figsize=(11.5, 3.8))
    fig.subplots_adjust(wspace=0.45)
    ax_s = ax_b.twinx()
    for s0, colour in ((lo, "tab:red"), (hi, "tab:blue")):
        ids = list(df[sig == s0]["run_id"])
        label = "no curriculum" if s0 == 0 else f"σ0 = {s0:g}"
        label += f" ({len(ids)} seeds)"
        for ax, key in ((ax_b, bpd_key), (ax_f, fid_key)):
            steps, mean, mn, mx = _band(_histories(client, ids, key))
            if steps:
                ax.plot(steps, mean, color=colour, label=label, marker="o", markersize=3)
                ax.fill_between(steps, mn, mx, color=colour, alpha=0.2)
        steps, mean, _, _ = _band(_histories(client, ids, "sigma_rgb"))
        if steps:
            ax_s.plot(steps, mean, color=colour, linestyle="--", alpha=0.6)
    ax_b.set_xlabel("update")
    ax_b.set_ylabel(f"{bpd_key} (solid)")
    ax_s.set_ylabel("RGB noise σ (dashed)")
    ax_b.legend(fontsize=8)
    ax_f.set_xlabel("update")
    ax_f.set_ylabel(fid_key)
    ax_f.legend(fontsize=8)
    for ax in (ax_b, ax_f):
        ax.grid(alpha=0.3)
    fig.suptitle("Figure 3 at this scale: with and without the noise curriculum")
    _save(fig, path)
    return lo, hi


def make_plots(experiment: str, tracking_uri: str, parent_run: str,
               out_dir: str | Path = "experiments/results") -> dict:
    """Write the sigma0 table and plots and Figure 3 for the sweep `parent_run` (module
    docstring), log them to the parent run; returns {"rows", "dir", "files"}."""
    from mlflow.tracking import MlflowClient

    from jetformer.train.checkpoint import atomic_write_bytes
    if not parent_run:
        raise ValueError("--sigma-plots needs --parent-run (the sweep's parent MLflow run id)")
    df = search_runs(experiment, tracking_uri, parent_run)
    client = MlflowClient(tracking_uri=tracking_uri)
    name = client.get_run(parent_run).info.run_name or parent_run
    out = Path(out_dir) / "sweeps" / name
    rows, fid, bpd = sigma0_rows(df)
    atomic_write_bytes(out / "noise_sigma0.csv", rows_csv(rows).encode())
    plot_sigma0(rows, fid, bpd, out / "noise_sigma0.png")
    files = [out / "noise_sigma0.csv", out / "noise_sigma0.png"]
    if len(rows) > 1:
        plot_figure3(client, df, out / "figure3.png")
        files.append(out / "figure3.png")
    for f in files:
        client.log_artifact(parent_run, str(f), "plots")
    return {"rows": rows, "dir": out, "files": files, "fid_key": fid, "bpd_key": bpd}
