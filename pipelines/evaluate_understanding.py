"""DVC stage `evaluate_understanding`: zero-shot classification of the val images by scoring
the class names (`eval.zeroshot_prompts`) after the image, and the held-out NLL in bits/dim of
val images beside the bits/dim of the same images stored as PNG."""
import sys

from jetformer.eval.stages import run_evaluate_understanding
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("evaluate_understanding", run_evaluate_understanding, __doc__, argv=argv,
                     metrics="metrics/understanding.json", plots="plots")


if __name__ == "__main__":
    sys.exit(main())
