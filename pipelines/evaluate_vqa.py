"""DVC stage `evaluate_vqa`: greedy answers of the VQA fine-tune to every val question, VQAv2
accuracy (official normalisation, min(#matches/3, 1) over annotator subsets), beside the most
common training answer per question type."""
import sys

from jetformer.eval.stages import run_evaluate_vqa
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("evaluate_vqa", run_evaluate_vqa, __doc__, argv=argv,
                     model="models/finetune_vqa", metrics="metrics/vqa.json", plots="plots")


if __name__ == "__main__":
    sys.exit(main())
