"""DVC stage `tokenizer`: train a SentencePiece model on the prepared training texts
(captions, questions, answers, class names), or install the given `tokenizer.model_path`."""
import argparse
import os
import shutil
import sys
from pathlib import Path

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset, read_metadata
from jetformer.data.tokenizer import TextTokenizer, train_tokenizer


def training_texts(prepared_dir: str) -> list[str]:
    """Every caption, question and answer of the train split, plus the class names."""
    ds = ArrowImageDataset(prepared_dir, "train")
    texts = [c.replace("_", " ") for c in read_metadata(prepared_dir)["classes"]]
    for shard in range(len(ds.paths)):
        table = ds._table(shard)
        for caps in table.column("captions").to_pylist():
            texts.extend(caps or [])
        for qas in table.column("qa").to_pylist():
            for qa in qas or []:
                texts.append(qa["question"])
                texts.extend(sorted(set(qa["answers"])))
    return texts


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
