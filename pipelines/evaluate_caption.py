"""DVC stage `evaluate_caption`: greedy captions of the val images by the captioning fine-tune,
CIDEr against the val captions, beside a constant "most common training caption" baseline."""
import sys

from jetformer.eval.stages import run_evaluate_caption
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("evaluate_caption", run_evaluate_caption, __doc__, argv=argv,
                     model="models/finetune_caption", metrics="metrics/caption.json", plots="plots")


if __name__ == "__main__":
    sys.exit(main())
