"""The evaluation DVC stages, one function each; every one returns the metrics dict it wrote
(`pipelines/*.py` only wire them to the command line through `jetformer.stage.run_stage`).

Bad input raises FileNotFoundError / ValueError naming the file or key, before any compute
where it can be known up front.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from jetformer.config import Config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.eval.report import read_json, write_csv, write_json
from jetformer.stage import write_metrics


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _splits(cfg: Config, *names: str) -> list[ArrowImageDataset]:
    return [ArrowImageDataset(cfg.data.prepared_dir, s) for s in names]


def _text_tokenizer(mcfg: Config, cfg: Config):
    from jetformer.data.tokenizer import TextTokenizer
    from jetformer.eval.commands import tokenizer_path
    return TextTokenizer(tokenizer_path(mcfg, cfg.train.out_dir))


# ----------------------------------------------------------------------------- judge
def run_judge(cfg: Config, out: str | Path = "models/judge.pt", metrics: str | Path = "metrics/judge.json") -> dict:
    """Train the domain judge on prepared real training images (scene attributes, or the class
    label where a source has none), measure it on the real val images, save it."""
    from jetformer.eval.judge import judge_accuracy, save_judge, scene_targets, train_judge

    train, val = _splits(cfg, "train", "val")
    t0 = time.time()
    targets = {name: [scene_targets(ds[i]) for i in range(len(ds))] for name, ds in (("train", train), ("val", val))}
    judge = train_judge(train.images(), targets["train"], steps=cfg.eval.judge_steps,
                        seed=cfg.seed, device=_device(), log=lambda s: print(s, flush=True))
    acc = judge_accuracy(judge.cpu(), val.images(), targets["val"])
    save_judge(judge, out)
    # trusted only when every head is right on >= judge_min_accuracy of the real val images
    worst = min(v for k, v in acc.items() if k != "all")
    result = {"judge_val_accuracy": worst, "judge_trusted": worst >= cfg.eval.judge_min_accuracy,
              "judge_heads": sorted(judge.vocab), "judge_train_seconds": time.time() - t0,
              **{f"judge_val_accuracy_{k}": v for k, v in acc.items()}}
    write_metrics(metrics, result)
    print("judge val accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    if not result["judge_trusted"]:
        print(f"WARNING: judge accuracy {worst:.3f} < eval.judge_min_accuracy "
              f"{cfg.eval.judge_min_accuracy}: its attribute accuracies and domain FID are not "
              "trustworthy (raise eval.judge_steps)", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- sample
def run_sample(cfg: Config, out_dir: str | Path = "data/eval/samples", plots: str | Path = "plots") -> dict:
    """Class-conditional and text-to-image samples with CFG for the first `eval.num_samples`
    val items, saved with what each was asked for (`t2i.pt`, `class.pt`), plus sample grids.

    - text-to-image (text models): one val caption per val image (seeded pick);
    - class samples: text models are prompted with `eval.class_prompt` ("a {}" -> "a circle"),
      class-conditional models get the label; the classes follow the val labels.
    Returns {kind: number of samples}."""
    from jetformer.eval.sampling import (caption_prompts, class_prompt, make_grid, sample_from_labels,
                                         sample_from_text, save_png)
    from jetformer.train.checkpoint import atomic_torch_save, load_trained

    model, mcfg = load_trained(cfg.train.out_dir)
    (val,) = _splits(cfg, "val")
    tokenizer = _text_tokenizer(mcfg, cfg) if model.conditioning == "text" else None
    e = cfg.eval
    n = min(e.num_samples, len(val))
    if n < 2:
        raise ValueError(f"eval.num_samples={e.num_samples} with {len(val)} val images gives {n} "
                         "samples; FID/precision/recall need at least 2")
    items = [val[i] for i in range(n)]
    common = dict(cfg_scale=e.cfg_scale, temperature=e.temperature, batch_size=e.batch_size,
                  log=lambda s: print(s, flush=True))
    out_dir, plots = Path(out_dir), Path(plots)
    for stale in [out_dir / "t2i.pt", out_dir / "class.pt", plots / "samples" / "t2i.png"]:
        stale.unlink(missing_ok=True)     # a previous run's samples must not outlive a model change
    t0 = time.time()
    report = {}

    # text-to-image, prompted by val captions
    if model.conditioning == "text" and all(it["captions"] for it in items):
        prompts = caption_prompts(items, cfg.seed)
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
    return report


# ----------------------------------------------------------------------------- generation
def run_evaluate_generation(cfg: Config, samples: str | Path = "data/eval/samples",
                            judge: str | Path = "models/judge.pt",
                            metrics: str | Path = "metrics/generation.json", plots: str | Path = "plots") -> dict:
    """FID, precision, recall and KID of the samples against the real val images (domain judge
    or Inception), and attribute accuracy of the samples (does the judge see the shape / colour
    the caption or class asked for?), beside the trivial baseline of a generator that always
    draws the most frequent asked value."""
    from jetformer.eval.attributes import attribute_accuracy, class_asked, t2i_asked
    from jetformer.eval.baselines import constant_attribute_accuracy
    from jetformer.eval.fidelity import fidelity_metrics, resolve_extractor
    from jetformer.eval.judge import load_judge

    judge_path = judge
    (val,) = _splits(cfg, "val")
    judge = load_judge(judge_path)
    extractor = resolve_extractor(cfg.eval.feature_extractor, cfg.data.source)
    real = val.images()
    result: dict = {"feature_extractor": extractor, "num_real": len(real)}
    rows: list[dict] = []
    kinds = [k for k in ("t2i", "class") if (Path(samples) / f"{k}.pt").is_file()]
    if not kinds:
        raise FileNotFoundError(f"no samples in {samples} (run `dvc repro sample`)")
    for kind in kinds:
        s = torch.load(Path(samples) / f"{kind}.pt", weights_only=False)
        images = s["images"]
        fm = fidelity_metrics(images, real, extractor=extractor, judge_path=judge_path,
                              inception_weights=cfg.eval.inception_weights,
                              batch_size=cfg.eval.batch_size, device=_device(), seed=cfg.seed)
        result.update({f"{kind}_{k}": v for k, v in fm.items()})
        pred = judge.predict(images)
        if kind == "t2i":
            asked = [t2i_asked(a) for a in s["attributes"]]
        else:
            asked = [class_asked(y, s["classes"], judge.vocab) for y in s["labels"]]
        acc, per = attribute_accuracy(pred, asked)
        result[f"{kind}_attribute_accuracy"] = acc
        result[f"baseline_{kind}_attribute_accuracy"] = (constant_attribute_accuracy([a for a in asked if a])
                                                         if any(asked) else None)
        result[f"{kind}_num_samples"] = len(images)
        for i, a in enumerate(asked):
            rows.append({"kind": kind, "index": i, "id": s["ids"][i], "prompt": s["prompts"][i],
                         **{f"asked_{h}": v for h, v in a.items()},
                         **{f"judged_{h}": pred[h][i] for h in judge.vocab}, "correct": per[i]})
        print(f"{kind}: FID {fm['fid']:.3f} precision {fm['precision']:.3f} recall {fm['recall']:.3f} "
              f"KID {fm['kid']:.4f}; attribute accuracy {acc:.3f} "
              f"(baseline {result[f'baseline_{kind}_attribute_accuracy']})")
    # the headline FID/PR/KID: text-to-image samples for text models (COCO-style), else class samples
    main_kind = "t2i" if "t2i" in kinds else "class"
    for k in ("fid", "precision", "recall", "kid"):
        result[k] = result[f"{main_kind}_{k}"]
    result["fid_samples"] = main_kind
    write_metrics(metrics, result)
    write_csv(Path(plots) / "generation_attributes.csv", rows)
    return result


# ----------------------------------------------------------------------------- fine-tunes
def run_finetune(cfg: Config, task: str, out_dir: str | Path | None = None, plots: str | Path = "plots") -> dict:
    """A short fine-tune of the trained multimodal model for captioning (image prefix ->
    caption) or VQA (image + question prefix -> answer), saved to `out_dir` (default
    models/finetune_<task>) with `finetune.json`; a class-conditional model or a source without
    the task's texts is saved unchanged with the reason in `skipped`. Returns finetune.json."""
    from jetformer.eval.finetune import finetune, save_finetuned
    from jetformer.train.checkpoint import MODEL_FILE, model_file, load_trained

    out_dir = Path(out_dir or f"models/finetune_{task}")
    model, mcfg = load_trained(cfg.train.out_dir)
    source = torch.load(model_file(cfg.train.out_dir), map_location="cpu", weights_only=False)
    (train,) = _splits(cfg, "train")
    info = {"task": task, "steps": 0, "skipped": ""}
    need = "captions" if task == "caption" else "qa"
    if model.conditioning != "text":
        info["skipped"] = "class-conditional model: no text head"
    elif len(train) == 0 or not train[0][need]:
        info["skipped"] = f"the source has no {need}"
    curve = []
    if not info["skipped"]:
        tokenizer = _text_tokenizer(mcfg, cfg)
        t0 = time.time()
        curve = finetune(model, mcfg, train, tokenizer, task=task, steps=cfg.eval.finetune_steps,
                         lr=cfg.eval.finetune_lr, batch_size=mcfg.train.batch_size, seed=cfg.seed,
                         log=lambda s: print(s, flush=True))
        info.update(steps=len(curve), seconds=time.time() - t0,
                    first_loss=curve[0]["loss"] if curve else None,
                    final_loss=sum(c["loss"] for c in curve[-10:]) / max(1, len(curve[-10:])) if curve else None)
    else:
        print(f"finetune {task}: skipped ({info['skipped']}); saving the trained model unchanged")
    save_finetuned(model, source, out_dir / MODEL_FILE, step=int(source.get("step", 0)) + len(curve))
    write_json(out_dir / "finetune.json", info)
    write_csv(Path(plots) / f"finetune_{task}.csv", curve, fields=["step", "loss", "lr"])
    return info


def _finetune_inputs(cfg: Config, model: str | Path) -> tuple[dict, ArrowImageDataset, ArrowImageDataset]:
    """(the fine-tune's finetune.json, val split, train split) for `evaluate_caption/vqa`."""
    return (read_json(Path(model) / "finetune.json"), *_splits(cfg, "val", "train"))


def _load_finetuned(model: str | Path, cfg: Config):
    """(fine-tuned model, its config, its text tokenizer)."""
    from jetformer.train.checkpoint import load_trained
    net, mcfg = load_trained(model)
    return net, mcfg, _text_tokenizer(mcfg, cfg)


def _skipped_outputs(info: dict, task: str, metric: str, score_column: str, metrics, plots) -> dict:
    """What `evaluate_<task>` writes when its fine-tune was skipped: null metrics with the reason,
    an empty predictions CSV (with the columns its DVC plot reads)."""
    result = {metric: None, f"baseline_{metric}": None, f"{task}_skipped": info["skipped"]}
    write_metrics(metrics, result)
    write_csv(Path(plots) / f"{task}_predictions.csv", [], fields=["index", score_column])
    print(f"evaluate_{task}: skipped ({info['skipped']})")
    return result


# ----------------------------------------------------------------------------- caption
def run_evaluate_caption(cfg: Config, model: str | Path = "models/finetune_caption",
                         metrics: str | Path = "metrics/caption.json", plots: str | Path = "plots") -> dict:
    """Greedy captions of the val images by the captioning fine-tune, CIDEr against the val
    captions, beside a constant "most common training caption" baseline."""
    from jetformer.eval.baselines import constant_caption_cider
    from jetformer.eval.cider import cider_score
    from jetformer.eval.finetune import generate_captions

    info, val, train = _finetune_inputs(cfg, model)
    if info.get("skipped"):
        return _skipped_outputs(info, "caption", "cider", "cider", metrics, plots)
    net, mcfg, tokenizer = _load_finetuned(model, cfg)
    t0 = time.time()
    items = [val[i] for i in range(len(val))]
    refs = {it["id"]: it["captions"] for it in items}
    preds = generate_captions(net, tokenizer, val.images(), max_len=cfg.eval.max_decode_len,
                              batch_size=cfg.eval.batch_size)
    score, per = cider_score({it["id"]: p for it, p in zip(items, preds)}, refs)
    train_captions = [c for caps in train.column("captions") for c in (caps or [])]
    base, base_caption = constant_caption_cider(train_captions, refs)
    result = {"cider": score, "baseline_cider": base, "baseline_caption": base_caption,
              "caption_finetune_steps": info.get("steps"), "caption_seconds": time.time() - t0}
    write_metrics(metrics, result)
    write_csv(Path(plots) / "caption_predictions.csv",
              [{"index": i, "id": it["id"], "prediction": p, "cider": per[it["id"]], "reference": it["captions"][0]}
               for i, (it, p) in enumerate(zip(items, preds))])
    print(f"CIDEr {score:.3f} (constant caption {base_caption!r}: {base:.3f})")
    for it, p in list(zip(items, preds))[:5]:
        print(f"  {p!r}  <- {it['captions'][0]!r}")
    return result


# ----------------------------------------------------------------------------- VQA
def run_evaluate_vqa(cfg: Config, model: str | Path = "models/finetune_vqa",
                     metrics: str | Path = "metrics/vqa.json", plots: str | Path = "plots") -> dict:
    """Greedy answers of the VQA fine-tune to every val question, VQAv2 accuracy (official
    normalisation, min(#matches/3, 1) over annotator subsets), beside the most common training
    answer per question type."""
    from jetformer.eval.baselines import per_type_vqa_accuracy
    from jetformer.eval.finetune import generate_answers
    from jetformer.eval.vqa import vqa_score

    info, val, train = _finetune_inputs(cfg, model)
    if info.get("skipped"):
        return _skipped_outputs(info, "vqa", "vqa_accuracy", "accuracy", metrics, plots)
    net, mcfg, tokenizer = _load_finetuned(model, cfg)
    t0 = time.time()
    index, ids, questions = [], [], []      # (val item, question) pairs, every question of every image
    for i in range(len(val)):
        item = val[i]
        for q in item["qa"]:
            index.append(i)
            ids.append(item["id"])
            questions.append(q)
    images = val.images()[torch.tensor(index, dtype=torch.long)]
    preds = generate_answers(net, tokenizer, images, [q["question"] for q in questions],
                             max_text_len=mcfg.tokenizer.max_text_len, max_len=cfg.eval.max_decode_len,
                             batch_size=cfg.eval.batch_size)
    s = vqa_score(preds, questions)
    train_questions = [q for qas in train.column("qa") for q in (qas or [])]
    base = per_type_vqa_accuracy(train_questions, questions)
    result = {"vqa_accuracy": s["accuracy"], "baseline_vqa_accuracy": base,
              "vqa_per_answer_type": s["per_answer_type"], "vqa_per_question_type": s["per_question_type"],
              "vqa_num_questions": len(questions), "vqa_finetune_steps": info.get("steps"),
              "vqa_seconds": time.time() - t0}
    write_metrics(metrics, result)
    write_csv(Path(plots) / "vqa_predictions.csv",
              [{"index": k, "id": i, "question_type": q.get("question_type", ""), "question": q["question"],
                "prediction": p, "answers": "|".join(q["answers"]), "accuracy": a}
               for k, (i, q, p, a) in enumerate(zip(ids, questions, preds, s["per_question"]))])
    print(f"VQA accuracy {s['accuracy']:.4f} (most common answer per question type: {base:.4f}); "
          + ", ".join(f"{k} {v:.3f}" for k, v in s["per_answer_type"].items()))
    return result


# ----------------------------------------------------------------------------- understanding
def run_evaluate_understanding(cfg: Config, metrics: str | Path = "metrics/understanding.json",
                               plots: str | Path = "plots") -> dict:
    """Zero-shot classification of the val images by scoring the class names after the image
    (`eval.zeroshot_prompts`, log-sum-exp over the templates), and the held-out NLL in bits/dim
    of val images beside the bits/dim of the same images stored as PNG."""
    from jetformer.eval.baselines import majority_class_accuracy
    from jetformer.eval.nll import heldout_bits_per_dim, png_bits_per_dim
    from jetformer.eval.sampling import class_prompt
    from jetformer.eval.zeroshot import zeroshot_classify
    from jetformer.train.checkpoint import load_trained

    model, mcfg = load_trained(cfg.train.out_dir)
    val, train = _splits(cfg, "val", "train")
    e = cfg.eval
    t0 = time.time()
    result: dict = {}
    images, labels = val.images(), val.labels()

    # held-out NLL vs PNG on the same images
    n = min(e.num_nll_images, len(val)) if e.num_nll_images else len(val)
    bpd = heldout_bits_per_dim(model, images[:n], batch_size=e.batch_size, seed=cfg.seed)
    png = png_bits_per_dim(images[:n])
    result.update(val_bits_per_dim=bpd.mean().item(), png_bits_per_dim=png.mean().item(), nll_num_images=n)
    print(f"held-out NLL {result['val_bits_per_dim']:.4f} bits/dim; PNG {result['png_bits_per_dim']:.4f} "
          f"bits/dim ({n} val images)")

    # zero-shot classification by scoring class names (text models)
    rows = []
    result["baseline_zeroshot_accuracy"] = majority_class_accuracy(train.labels().tolist(), labels.tolist())
    if model.conditioning == "text":
        tokenizer = _text_tokenizer(mcfg, cfg)
        names = [[class_prompt(c, t) for c in val.classes] for t in e.zeroshot_prompts]  # [P][C]
        encoded = [tokenizer.encode_batch(n, mcfg.tokenizer.max_text_len) for n in names]
        text, mask = (torch.stack(parts) for parts in zip(*encoded))          # [P, C, T] each
        pred, scores = zeroshot_classify(model, images, text, mask, batch_size=e.batch_size)
        result["zeroshot_accuracy"] = (pred == labels).float().mean().item()
        result["zeroshot_prompts"] = names
        rows = [{"index": i, "label": val.classes[y], "predicted": val.classes[p],
                 **{f"logp_{c}": s for c, s in zip(val.classes, sc)}}
                for i, (y, p, sc) in enumerate(zip(labels.tolist(), pred.tolist(), scores.tolist()))]
        print(f"zero-shot accuracy {result['zeroshot_accuracy']:.4f} (majority class "
              f"{result['baseline_zeroshot_accuracy']:.4f}) with prompts {names}")
    else:
        result["zeroshot_accuracy"] = None
        print("zero-shot classification: skipped (class-conditional model has no text head)")
    result["understanding_seconds"] = time.time() - t0
    write_metrics(metrics, result)
    write_csv(Path(plots) / "zeroshot_predictions.csv", rows, fields=["index", "label", "predicted"])
    write_csv(Path(plots) / "nll_per_image.csv",
              [{"index": i, "bits_per_dim": b, "png_bits_per_dim": p} for i, (b, p) in
               enumerate(zip(bpd.tolist(), png.tolist()))])
    return result


# ----------------------------------------------------------------------------- report
REPORT_PARTS = ("judge", "generation", "caption", "vqa", "understanding")
REPORT_ARTIFACTS = ("samples", "generation_attributes.csv", "caption_predictions.csv",
                    "vqa_predictions.csv", "zeroshot_predictions.csv", "nll_per_image.csv",
                    "finetune_caption.csv", "finetune_vqa.csv")


def run_eval_report(cfg: Config, metrics_dir: str | Path = "metrics", plots: str | Path = "plots",
                    out: str | Path = "metrics/eval.json",
                    train_metrics: str | Path = "metrics/train.json") -> dict:
    """Check every evaluation stage's metrics against the trivial baselines, log them, the
    sample grids and the per-example predictions to a new MLflow evaluation run nested under
    the training's run (best effort), and write the summary `out` (`report_metrics`)."""
    from jetformer.eval.report import (log_evaluation, merge_results, report_metrics,
                                       training_run_id)

    merged = merge_results({p: read_json(Path(metrics_dir) / f"{p}.json") for p in REPORT_PARTS})
    numeric = {k: v for k, v in merged.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    artifacts = [(str(Path(plots) / a), "samples" if a == "samples" else "predictions")
                 for a in REPORT_ARTIFACTS] + \
                [(str(Path(metrics_dir) / f"{p}.json"), "metrics") for p in REPORT_PARTS]
    try:
        run_id = log_evaluation(cfg, training_run_id(train_metrics), numeric, artifacts)
    except Exception as e:  # noqa: BLE001 - tracking is best effort; the metrics file is written
        print(f"WARNING: MLflow logging failed ({type(e).__name__}: {e})", file=sys.stderr)
        run_id = None
    summary = write_metrics(out, report_metrics(merged, run_id))
    for k in sorted(numeric):
        print(f"  {k:40s} {numeric[k]:.4f}" if isinstance(numeric[k], float) else f"  {k:40s} {numeric[k]}")
    print("beats baselines: " + ", ".join(f"{k.removeprefix('beats_')} {'yes' if v else 'NO'}"
                                          for k, v in summary.items() if k.startswith("beats_")))
    if run_id:
        print(f"logged to MLflow evaluation run {run_id} (training run "
              f"{training_run_id(train_metrics) or 'unknown'})")
    return {**merged, **summary}
