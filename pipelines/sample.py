"""DVC stage `sample`: class-conditional and text-to-image samples with CFG (KV cache) for the
val captions / classes; saves the samples with what each was asked for, and sample grids.

- text-to-image (text models): one val caption per val image (seeded pick);
- class samples: text models are prompted with `eval.class_prompt` ("a {}" -> "a circle"),
  class-conditional models get the label; the classes follow the val labels.
"""
import sys

from jetformer.eval.stages import run_sample
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("sample", run_sample, __doc__, argv=argv,
                     out_dir="data/eval/samples", plots="plots")


if __name__ == "__main__":
    sys.exit(main())
