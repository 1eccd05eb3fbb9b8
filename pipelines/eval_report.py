"""DVC stage `eval_report`: merge every evaluation stage's metrics (and the trivial baselines)
into `metrics/eval.json`, and log them, the sample grids and the per-example predictions to the
MLflow run of the trained model."""
import argparse
import sys
from pathlib import Path

from jetformer.config import ConfigError, load_config
from jetformer.eval.report import log_to_training_run, merge_results, read_json, write_json

PARTS = ("judge", "generation", "caption", "vqa", "understanding")
ARTIFACTS = ("samples", "generation_attributes.csv", "caption_predictions.csv",
             "vqa_predictions.csv", "zeroshot_predictions.csv", "nll_per_image.csv",
             "finetune_caption.csv", "finetune_vqa.csv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics-dir", default="metrics")
    ap.add_argument("--plots", default="plots")
    ap.add_argument("--out", default="metrics/eval.json")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        parts = {p: read_json(Path(args.metrics_dir) / f"{p}.json") for p in PARTS}
        merged = merge_results(parts)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"eval_report failed: {e}", file=sys.stderr)
        return 1
    checks = {  # the quality bar: the model must beat the trivial baselines
        "t2i_attribute_accuracy": ("baseline_t2i_attribute_accuracy", ">"),
        "class_attribute_accuracy": ("baseline_class_attribute_accuracy", ">"),
        "cider": ("baseline_cider", ">"),
        "vqa_accuracy": ("baseline_vqa_accuracy", ">"),
        "zeroshot_accuracy": ("baseline_zeroshot_accuracy", ">"),
        "val_bits_per_dim": ("png_bits_per_dim", "<"),
    }
    beats = {}
    for k, (b, op) in checks.items():
        v, ref = merged.get(k), merged.get(b)
        if v is not None and ref is not None:
            beats[k] = bool(v > ref) if op == ">" else bool(v < ref)
    merged["beats_baselines"] = beats
    write_json(args.out, merged)
    numeric = {k: v for k, v in merged.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    artifacts = [(str(Path(args.plots) / a), "eval/samples" if a == "samples" else "eval") for a in ARTIFACTS] + \
                [(str(Path(args.metrics_dir) / f"{p}.json"), "eval/metrics") for p in PARTS] + [(args.out, "eval")]
    try:
        run_id = log_to_training_run(cfg, numeric, artifacts)
    except Exception as e:  # noqa: BLE001 - tracking is best effort; the metrics file is written
        print(f"WARNING: MLflow logging failed ({type(e).__name__}: {e})", file=sys.stderr)
        run_id = None
    for k in sorted(numeric):
        print(f"  {k:40s} {numeric[k]:.4f}" if isinstance(numeric[k], float) else f"  {k:40s} {numeric[k]}")
    print("beats baselines: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in beats.items()))
    if run_id:
        print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
