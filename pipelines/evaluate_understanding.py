"""DVC stage `evaluate_understanding`: zero-shot classification of the val images by scoring
the class names (`eval.zeroshot_prompt`) after the image, and the held-out NLL in bits/dim of
val images beside the bits/dim of the same images stored as PNG."""
import argparse
import sys
import time
from pathlib import Path

import torch

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.data.tokenizer import TextTokenizer
from jetformer.eval.baselines import majority_class_accuracy
from jetformer.eval.commands import tokenizer_path
from jetformer.eval.nll import heldout_bits_per_dim, png_bits_per_dim
from jetformer.eval.report import write_csv, write_json
from jetformer.eval.sampling import class_prompt
from jetformer.eval.zeroshot import zeroshot_classify
from jetformer.train.checkpoint import load_trained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/understanding.json")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        model, mcfg = load_trained(cfg.train.out_dir)
        val = ArrowImageDataset(cfg.data.prepared_dir, "val")
        train = ArrowImageDataset(cfg.data.prepared_dir, "train")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"evaluate_understanding failed: {e}", file=sys.stderr)
        return 1
    e = cfg.eval
    t0 = time.time()
    metrics: dict = {}
    images, labels = val.images(), val.labels()

    # held-out NLL vs PNG on the same images
    n = min(e.num_nll_images, len(val)) if e.num_nll_images else len(val)
    bpd = heldout_bits_per_dim(model, images[:n], batch_size=e.batch_size, seed=cfg.seed)
    png = png_bits_per_dim(images[:n])
    metrics.update(val_bits_per_dim=bpd.mean().item(), png_bits_per_dim=png.mean().item(), nll_num_images=n)
    print(f"held-out NLL {metrics['val_bits_per_dim']:.4f} bits/dim; PNG {metrics['png_bits_per_dim']:.4f} "
          f"bits/dim ({n} val images)")

    # zero-shot classification by scoring class names (text models)
    rows = []
    metrics["baseline_zeroshot_accuracy"] = majority_class_accuracy(train.labels().tolist(), labels.tolist())
    if model.conditioning == "text":
        tokenizer = TextTokenizer(tokenizer_path(mcfg, cfg.train.out_dir))
        names = [class_prompt(c, e.zeroshot_prompt) for c in val.classes]
        text, mask = tokenizer.encode_batch(names, mcfg.tokenizer.max_text_len)
        pred, scores = zeroshot_classify(model, images, text, mask, batch_size=e.batch_size)
        metrics["zeroshot_accuracy"] = (pred == labels).float().mean().item()
        metrics["zeroshot_prompts"] = names
        rows = [{"index": i, "label": val.classes[y], "predicted": val.classes[p],
                 **{f"logp_{c}": s for c, s in zip(val.classes, sc)}}
                for i, (y, p, sc) in enumerate(zip(labels.tolist(), pred.tolist(), scores.tolist()))]
        print(f"zero-shot accuracy {metrics['zeroshot_accuracy']:.4f} (majority class "
              f"{metrics['baseline_zeroshot_accuracy']:.4f}) with prompts {names}")
    else:
        metrics["zeroshot_accuracy"] = None
        print("zero-shot classification: skipped (class-conditional model has no text head)")
    metrics["understanding_seconds"] = time.time() - t0
    write_json(args.metrics, metrics)
    write_csv(Path(args.plots) / "zeroshot_predictions.csv", rows, fields=["index", "label", "predicted"])
    write_csv(Path(args.plots) / "nll_per_image.csv",
              [{"index": i, "bits_per_dim": b, "png_bits_per_dim": p} for i, (b, p) in
               enumerate(zip(bpd.tolist(), png.tolist()))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
