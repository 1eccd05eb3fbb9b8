"""DVC stages `finetune_caption` / `finetune_vqa`: a short fine-tune of the trained multimodal
model for captioning (image prefix -> caption) or VQA (image + question prefix -> answer).

    python pipelines/finetune.py caption|vqa
"""
import sys

from jetformer.eval.finetune import TASKS
from jetformer.eval.stages import run_finetune
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("finetune {task}", run_finetune, __doc__, argv=argv,
                     positional={"task": TASKS},
                     out_dir=None, plots="plots")


if __name__ == "__main__":
    sys.exit(main())
