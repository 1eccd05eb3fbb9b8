"""DVC stage `evaluate_vqa`: greedy answers of the VQA fine-tune to every val question, VQAv2
accuracy (official normalisation, min(#matches/3, 1) over annotator subsets), beside the most
common training answer per question type."""
import argparse
import sys
import time
from pathlib import Path

import torch

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.data.tokenizer import TextTokenizer
from jetformer.eval.baselines import per_type_vqa_accuracy
from jetformer.eval.commands import tokenizer_path
from jetformer.eval.finetune import generate_answers
from jetformer.eval.report import read_json, write_csv, write_json
from jetformer.eval.vqa import vqa_score
from jetformer.train.checkpoint import load_trained


def all_questions(ds: ArrowImageDataset) -> list[dict]:
    return [q for shard in range(len(ds.paths)) for qas in ds._table(shard).column("qa").to_pylist()
            for q in (qas or [])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/finetune_vqa")
    ap.add_argument("--metrics", default="metrics/vqa.json")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        info = read_json(Path(args.model) / "finetune.json")
        val = ArrowImageDataset(cfg.data.prepared_dir, "val")
        train = ArrowImageDataset(cfg.data.prepared_dir, "train")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"evaluate_vqa failed: {e}", file=sys.stderr)
        return 1
    if info.get("skipped"):
        write_json(args.metrics, {"vqa_accuracy": None, "baseline_vqa_accuracy": None,
                                  "vqa_skipped": info["skipped"]})
        write_csv(Path(args.plots) / "vqa_predictions.csv", [], fields=["index", "accuracy"])
        print(f"evaluate_vqa: skipped ({info['skipped']})")
        return 0
    model, mcfg = load_trained(args.model)
    tokenizer = TextTokenizer(tokenizer_path(mcfg, cfg.train.out_dir))
    t0 = time.time()
    index, ids, questions = [], [], []      # (val item, question) pairs, every question of every image
    for i in range(len(val)):
        item = val[i]
        for q in item["qa"]:
            index.append(i)
            ids.append(item["id"])
            questions.append(q)
    images = val.images()[torch.tensor(index, dtype=torch.long)]
    preds = generate_answers(model, tokenizer, images, [q["question"] for q in questions],
                             max_text_len=mcfg.tokenizer.max_text_len, max_len=cfg.eval.max_decode_len,
                             batch_size=cfg.eval.batch_size)
    s = vqa_score(preds, questions)
    base = per_type_vqa_accuracy(all_questions(train), questions)
    write_json(args.metrics, {"vqa_accuracy": s["accuracy"], "baseline_vqa_accuracy": base,
                              "vqa_per_answer_type": s["per_answer_type"],
                              "vqa_per_question_type": s["per_question_type"],
                              "vqa_num_questions": len(questions), "vqa_finetune_steps": info.get("steps"),
                              "vqa_seconds": time.time() - t0})
    write_csv(Path(args.plots) / "vqa_predictions.csv",
              [{"index": k, "id": i, "question_type": q.get("question_type", ""), "question": q["question"],
                "prediction": p, "answers": "|".join(q["answers"]), "accuracy": a}
               for k, (i, q, p, a) in enumerate(zip(ids, questions, preds, s["per_question"]))])
    print(f"VQA accuracy {s['accuracy']:.4f} (most common answer per question type: {base:.4f}); "
          + ", ".join(f"{k} {v:.3f}" for k, v in s["per_answer_type"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
