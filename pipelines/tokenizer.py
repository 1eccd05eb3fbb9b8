"""DVC stage `tokenizer`: train a SentencePiece model on the prepared training texts
(captions, questions, answers, class names), or install the given `tokenizer.model_path`."""
import sys

from jetformer.data.stages import run_tokenizer
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("tokenizer", run_tokenizer, __doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
