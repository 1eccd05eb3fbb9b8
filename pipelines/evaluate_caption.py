"""DVC stage `evaluate_caption`: greedy captions of the val images by the captioning fine-tune,
CIDEr against the val captions, beside a constant "most common training caption" baseline."""
import argparse
import sys
import time
from pathlib import Path

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.data.tokenizer import TextTokenizer
from jetformer.eval.baselines import constant_caption_cider
from jetformer.eval.cider import cider_score
from jetformer.eval.commands import tokenizer_path
from jetformer.eval.finetune import generate_captions
from jetformer.eval.report import read_json, write_csv, write_json
from jetformer.train.checkpoint import load_trained


def all_captions(ds: ArrowImageDataset) -> list[str]:
    return [c for shard in range(len(ds.paths))
            for caps in ds._table(shard).column("captions").to_pylist() for c in (caps or [])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/finetune_caption")
    ap.add_argument("--metrics", default="metrics/caption.json")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        info = read_json(Path(args.model) / "finetune.json")
        val = ArrowImageDataset(cfg.data.prepared_dir, "val")
        train = ArrowImageDataset(cfg.data.prepared_dir, "train")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"evaluate_caption failed: {e}", file=sys.stderr)
        return 1
    if info.get("skipped"):
        write_json(args.metrics, {"cider": None, "baseline_cider": None, "caption_skipped": info["skipped"]})
        write_csv(Path(args.plots) / "caption_predictions.csv", [], fields=["index", "cider"])
        print(f"evaluate_caption: skipped ({info['skipped']})")
        return 0
    model, mcfg = load_trained(args.model)
    tokenizer = TextTokenizer(tokenizer_path(mcfg, cfg.train.out_dir))
    t0 = time.time()
    items = [val[i] for i in range(len(val))]
    refs = {it["id"]: it["captions"] for it in items}
    preds = generate_captions(model, tokenizer, val.images(), max_len=cfg.eval.max_decode_len,
                              batch_size=cfg.eval.batch_size)
    score, per = cider_score({it["id"]: p for it, p in zip(items, preds)}, refs)
    base, base_caption = constant_caption_cider(all_captions(train), refs)
    write_json(args.metrics, {"cider": score, "baseline_cider": base, "baseline_caption": base_caption,
                              "caption_finetune_steps": info.get("steps"), "caption_seconds": time.time() - t0})
    write_csv(Path(args.plots) / "caption_predictions.csv",
              [{"index": i, "id": it["id"], "prediction": p, "cider": per[it["id"]], "reference": it["captions"][0]}
               for i, (it, p) in enumerate(zip(items, preds))])
    print(f"CIDEr {score:.3f} (constant caption {base_caption!r}: {base:.3f})")
    for it, p in list(zip(items, preds))[:5]:
        print(f"  {p!r}  <- {it['captions'][0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
