"""DVC stage `sample`: class-conditional and text-to-image samples with CFG (KV cache) for the
val captions / classes; saves the samples with what each was asked for, and sample grids.

- text-to-image (text models): one val caption per val image (seeded pick);
- class samples: text models are prompted with `eval.class_prompt` ("a {}" -> "a circle"),
  class-conditional models get the label; the classes follow the val labels.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.data.tokenizer import TextTokenizer
from jetformer.eval.commands import tokenizer_path
from jetformer.eval.sampling import class_prompt, make_grid, sample_from_labels, sample_from_text, save_png
from jetformer.train.checkpoint import atomic_torch_save, load_trained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out-dir", default="data/eval/samples")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        model, mcfg = load_trained(cfg.train.out_dir)
        val = ArrowImageDataset(cfg.data.prepared_dir, "val")
        tokenizer = TextTokenizer(tokenizer_path(mcfg, cfg.train.out_dir)) if model.conditioning == "text" else None
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"sample failed: {e}", file=sys.stderr)
        return 1
    e = cfg.eval
    n = min(e.num_samples, len(val))
    if n < 2:
        print(f"sample failed: eval.num_samples={e.num_samples} with {len(val)} val images gives {n} "
              "samples; FID/precision/recall need at least 2", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(cfg.seed)
    items = [val[i] for i in range(n)]
    common = dict(cfg_scale=e.cfg_scale, temperature=e.temperature, batch_size=e.batch_size,
                  log=lambda s: print(s, flush=True))
    out_dir, plots = Path(args.out_dir), Path(args.plots)
    for stale in [out_dir / "t2i.pt", out_dir / "class.pt", plots / "samples" / "t2i.png"]:
        stale.unlink(missing_ok=True)     # a previous run's samples must not outlive a model change
    t0 = time.time()
    report = {}

    # text-to-image, prompted by val captions
    if model.conditioning == "text" and all(it["captions"] for it in items):
        prompts = [it["captions"][int(torch.randint(len(it["captions"]), (), generator=g))] for it in items]
        images = sample_from_text(model, tokenizer, prompts, max_text_len=mcfg.tokenizer.max_text_len,
                                  seed=cfg.seed, **common)
        atomic_torch_save({"images": images, "prompts": prompts, "ids": [it["id"] for it in items],
                           "attributes": [it["attributes"] for it in items]}, out_dir / "t2i.pt")
        save_png(make_grid(images[:64], nrow=8, scale=4), plots / "samples" / "t2i.png")
        report["t2i"] = len(images)
    else:
        print("sample: no text-to-image samples (class-conditional model or a source without captions)")

    # class samples, following the val labels
    labels = [it["label"] for it in items]
    if model.conditioning == "class":
        images = sample_from_labels(model, labels, seed=cfg.seed + 1, **common)
        prompts = [f"label {y}" for y in labels]
    else:
        prompts = [class_prompt(val.classes[y], e.class_prompt) for y in labels]
        images = sample_from_text(model, tokenizer, prompts, max_text_len=mcfg.tokenizer.max_text_len,
                                  seed=cfg.seed + 1, **common)
    atomic_torch_save({"images": images, "prompts": prompts, "labels": labels, "classes": val.classes,
                       "ids": [it["id"] for it in items]}, out_dir / "class.pt")
    order = sorted(range(len(labels)), key=lambda i: labels[i])[:64]   # grid sorted by class
    save_png(make_grid(images[order], nrow=8, scale=4), plots / "samples" / "class.png")
    report["class"] = len(images)
    print(f"sample: {report} in {time.time() - t0:.0f}s (cfg {e.cfg_scale}, temperature {e.temperature})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
