"""DVC stage `eval_report`: merge every evaluation stage's metrics (and the trivial baselines)
into `metrics/eval.json`, and log them, the sample grids and the per-example predictions to the
MLflow run of the trained model."""
import sys

from jetformer.eval.stages import run_eval_report
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("eval_report", run_eval_report, __doc__, argv=argv,
                     metrics_dir="metrics", plots="plots", out="metrics/eval.json")


if __name__ == "__main__":
    sys.exit(main())
