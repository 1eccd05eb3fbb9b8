"""DVC stage `judge`: train the domain judge on prepared real training images (scene attributes,
or the class label where a source has none), report its accuracy on real val images, save it."""
import argparse
import sys
import time

import torch

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.eval.judge import judge_accuracy, save_judge, scene_targets, train_judge
from jetformer.eval.report import write_json


def items_targets(ds: ArrowImageDataset) -> list[dict]:
    return [scene_targets(ds[i]) for i in range(len(ds))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/judge.pt")
    ap.add_argument("--metrics", default="metrics/judge.json")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        train, val = (ArrowImageDataset(cfg.data.prepared_dir, s) for s in ("train", "val"))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"judge failed: {e}", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    judge = train_judge(train.images(), items_targets(train), steps=cfg.eval.judge_steps,
                        seed=cfg.seed, device=device, log=lambda s: print(s, flush=True))
    acc = judge_accuracy(judge.cpu(), val.images(), items_targets(val))
    save_judge(judge, args.out)
    # trusted only when every head is right on >= judge_min_accuracy of the real val images
    worst = min(v for k, v in acc.items() if k != "all")
    metrics = {"judge_val_accuracy": worst, "judge_trusted": worst >= cfg.eval.judge_min_accuracy,
               "judge_heads": sorted(judge.vocab), "judge_train_seconds": time.time() - t0,
               **{f"judge_val_accuracy_{k}": v for k, v in acc.items()}}
    write_json(args.metrics, metrics)
    print("judge val accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    if not metrics["judge_trusted"]:
        print(f"WARNING: judge accuracy {worst:.3f} < eval.judge_min_accuracy "
              f"{cfg.eval.judge_min_accuracy}: its attribute accuracies and domain FID are not "
              "trustworthy (raise eval.judge_steps)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
