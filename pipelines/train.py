"""DVC stage `train`: train JetFormer with Ray Train on `params.yaml` and write the checkpoint
(`train.out_dir`), `metrics/train.json`, `plots/train.csv`, `plots/train_samples/` and the MLflow
run. An interrupted run (Ctrl-C, SIGTERM) resumes from its last checkpoint when started again."""
import sys

from jetformer.stage import run_stage
from jetformer.train.launch import run_training      # (Ray is imported only when training starts)
from jetformer.train.loop import NonFiniteLossError


def main(argv=None) -> int:
    return run_stage("train", run_training, __doc__, argv=argv, overlays=True,
                     errors=(NonFiniteLossError,), metrics_path="metrics/train.json",
                     curves_path="plots/train.csv", samples_dir="plots/train_samples")


if __name__ == "__main__":
    sys.exit(main())
