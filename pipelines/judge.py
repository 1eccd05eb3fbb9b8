"""DVC stage `judge`: train the domain judge on prepared real training images (scene attributes,
or the class label where a source has none), report its accuracy on real val images, save it."""
import sys

from jetformer.eval.stages import run_judge
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("judge", run_judge, __doc__, argv=argv,
                     out="models/judge.pt", metrics="metrics/judge.json")


if __name__ == "__main__":
    sys.exit(main())
