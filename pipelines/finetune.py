"""DVC stages `finetune_caption` / `finetune_vqa`: a short fine-tune of the trained multimodal
model for captioning (image prefix -> caption) or VQA (image + question prefix -> answer).

    python pipelines/finetune.py caption|vqa
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
from jetformer.eval.finetune import TASKS, finetune, save_finetuned
from jetformer.eval.report import write_csv, write_json
from jetformer.train.checkpoint import MODEL_FILE, _model_file, load_trained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out-dir", default=None, help="default models/finetune_<task>")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args()
    out_dir = Path(args.out_dir or f"models/finetune_{args.task}")
    try:
        cfg = load_config(args.params)
        model, mcfg = load_trained(cfg.train.out_dir)
        source = torch.load(_model_file(cfg.train.out_dir), map_location="cpu", weights_only=False)
        train = ArrowImageDataset(cfg.data.prepared_dir, "train")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"finetune {args.task} failed: {e}", file=sys.stderr)
        return 1
    info = {"task": args.task, "steps": 0, "skipped": ""}
    need = "captions" if args.task == "caption" else "qa"
    if model.conditioning != "text":
        info["skipped"] = "class-conditional model: no text head"
    elif len(train) == 0 or not train[0][need]:
        info["skipped"] = f"the source has no {need}"
    curve = []
    if not info["skipped"]:
        tokenizer = TextTokenizer(tokenizer_path(mcfg, cfg.train.out_dir))
        t0 = time.time()
        curve = finetune(model, mcfg, train, tokenizer, task=args.task, steps=cfg.eval.finetune_steps,
                         lr=cfg.eval.finetune_lr, batch_size=mcfg.train.batch_size, seed=cfg.seed,
                         log=lambda s: print(s, flush=True))
        info.update(steps=len(curve), seconds=time.time() - t0,
                    first_loss=curve[0]["loss"] if curve else None,
                    final_loss=sum(c["loss"] for c in curve[-10:]) / max(1, len(curve[-10:])) if curve else None)
    else:
        print(f"finetune {args.task}: skipped ({info['skipped']}); saving the trained model unchanged")
    save_finetuned(model, source, out_dir / MODEL_FILE, step=int(source.get("step", 0)) + len(curve))
    write_json(out_dir / "finetune.json", info)
    write_csv(Path(args.plots) / f"finetune_{args.task}.csv", curve, fields=["step", "loss", "lr"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
