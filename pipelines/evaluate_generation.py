"""DVC stage `evaluate_generation`: FID, precision, recall and KID of the samples against the
real val images (torch-fidelity; domain judge or Inception), and attribute accuracy of the
samples (does the judge see the shape / colour the caption or class asked for?), beside the
trivial baseline of a generator that always draws the most frequent asked value."""
import sys

from jetformer.eval.stages import run_evaluate_generation
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("evaluate_generation", run_evaluate_generation, __doc__, argv=argv,
                     samples="data/eval/samples", judge="models/judge.pt",
                     metrics="metrics/generation.json", plots="plots")


if __name__ == "__main__":
    sys.exit(main())
