"""DVC stage `evaluate_generation`: FID, precision, recall and KID of the samples against the
real val images (torch-fidelity; domain judge or Inception), and attribute accuracy of the
samples (does the judge see the shape / colour the caption or class asked for?), beside the
trivial baseline of a generator that always draws the most frequent asked value."""
import argparse
import sys
from pathlib import Path

import torch

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.eval.attributes import attribute_accuracy, class_asked, t2i_asked
from jetformer.eval.baselines import constant_attribute_accuracy
from jetformer.eval.fidelity import fidelity_metrics, resolve_extractor
from jetformer.eval.judge import load_judge
from jetformer.eval.report import write_csv, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--samples", default="data/eval/samples")
    ap.add_argument("--judge", default="models/judge.pt")
    ap.add_argument("--metrics", default="metrics/generation.json")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        val = ArrowImageDataset(cfg.data.prepared_dir, "val")
        judge = load_judge(args.judge)
        extractor = resolve_extractor(cfg.eval.feature_extractor, cfg.data.source)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"evaluate_generation failed: {e}", file=sys.stderr)
        return 1
    real = val.images()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics: dict = {"feature_extractor": extractor, "num_real": len(real)}
    rows: list[dict] = []
    kinds = [k for k in ("t2i", "class") if (Path(args.samples) / f"{k}.pt").is_file()]
    if not kinds:
        print(f"evaluate_generation failed: no samples in {args.samples} (run `dvc repro sample`)", file=sys.stderr)
        return 1
    for kind in kinds:
        s = torch.load(Path(args.samples) / f"{kind}.pt", weights_only=False)
        images = s["images"]
        try:
            fm = fidelity_metrics(images, real, extractor=extractor, judge_path=args.judge,
                                  inception_weights=cfg.eval.inception_weights,
                                  batch_size=cfg.eval.batch_size, device=device, seed=cfg.seed)
        except (FileNotFoundError, ValueError) as e:
            print(f"evaluate_generation failed: {e}", file=sys.stderr)
            return 1
        metrics.update({f"{kind}_{k}": v for k, v in fm.items()})
        pred = judge.predict(images)
        if kind == "t2i":
            asked = [t2i_asked(a) for a in s["attributes"]]
        else:
            asked = [class_asked(y, s["classes"], judge.vocab) for y in s["labels"]]
        acc, per = attribute_accuracy(pred, asked)
        metrics[f"{kind}_attribute_accuracy"] = acc
        metrics[f"baseline_{kind}_attribute_accuracy"] = (constant_attribute_accuracy([a for a in asked if a])
                                                          if any(asked) else None)
        metrics[f"{kind}_num_samples"] = len(images)
        for i, a in enumerate(asked):
            rows.append({"kind": kind, "index": i, "id": s["ids"][i], "prompt": s["prompts"][i],
                         **{f"asked_{h}": v for h, v in a.items()},
                         **{f"judged_{h}": pred[h][i] for h in judge.vocab}, "correct": per[i]})
        print(f"{kind}: FID {fm['fid']:.3f} precision {fm['precision']:.3f} recall {fm['recall']:.3f} "
              f"KID {fm['kid']:.4f}; attribute accuracy {acc:.3f} "
              f"(baseline {metrics[f'baseline_{kind}_attribute_accuracy']})")
    # the headline FID/PR/KID: text-to-image samples for text models (COCO-style), else class samples
    main_kind = "t2i" if "t2i" in kinds else "class"
    for k in ("fid", "precision", "recall", "kid"):
        metrics[k] = metrics[f"{main_kind}_{k}"]
    metrics["fid_samples"] = main_kind
    write_json(args.metrics, metrics)
    write_csv(Path(args.plots) / "generation_attributes.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
