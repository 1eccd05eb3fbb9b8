"""DVC stage `eval_report`: check every evaluation stage's metrics against the trivial baselines
(`metrics/eval.json`), and log them, the sample grids and the per-example predictions to a new
MLflow evaluation run nested under the training's run."""
import sys

from jetformer.eval.stages import run_eval_report
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("eval_report", run_eval_report, __doc__, argv=argv,
                     metrics_dir="metrics", train_metrics="metrics/train.json", plots="plots",
                     out="metrics/eval.json")


if __name__ == "__main__":
    sys.exit(main())
