"""DVC stage `tokenizer`: train a SentencePiece model on the prepared training texts
(captions, questions, answers, class names), or install the given `tokenizer.model_path`."""
import argparse
import os
import shutil
import sys
from pathlib import Path

from jetformer.config import ConfigError, load_config
from jetformer.data.tokenizer import TextTokenizer, train_tokenizer, training_texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        t = cfg.tokenizer
        out = Path(t.out_path)
        if t.model_path:
            tok = TextTokenizer(t.model_path)          # checks the special ids
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            shutil.copyfile(t.model_path, tmp)
            os.replace(tmp, out)
            print(f"tokenizer: using {t.model_path} (vocab {tok.vocab_size}) -> {out}")
        else:
            texts = training_texts(cfg.data.prepared_dir)
            tok = train_tokenizer(texts, out, t.vocab_size)
            print(f"tokenizer: trained on {len(texts)} texts, vocab {tok.vocab_size} -> {out}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"tokenizer failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
