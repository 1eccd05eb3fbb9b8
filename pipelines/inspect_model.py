"""DVC stage `inspect`: likelihood maps, latent manipulations and completions of a few val
images (plots/inspect/), and the text -> image -> text round-trip consistency of the
text-to-image samples (metrics/inspect.json); logged to the training's MLflow run.
(Not named inspect.py: this directory is sys.path[0] of every stage script, where such a file
would shadow the standard library's `inspect`.)"""
import sys

from jetformer.inspect.stage import run_inspect
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("inspect", run_inspect, __doc__, argv=argv, plots="plots/inspect",
                     metrics="metrics/inspect.json", samples="data/eval/samples",
                     captioner="models/finetune_caption", table="plots/inspect_roundtrip.csv")


if __name__ == "__main__":
    sys.exit(main())
