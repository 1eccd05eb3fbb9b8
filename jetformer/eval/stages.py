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
from jetformer.safe_io import safe_load
from jetformer.stage import write_metrics


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _splits(cfg: Config, *names: str) -> list[ArrowImageDataset]:
    """Splits of the pretraining data."""
    return [ArrowImageDataset(cfg.data.prepared_dir, s) for s in names]


def _role_splits(cfg: Config, role: str, *names: str
                 ) -> tuple[list[ArrowImageDataset] | None, dict]:
    """(splits of `role`'s prepared data or None when the role has no source, its role.json)."""
    from jetformer.config import role_prepared_dir
    from jetformer.data.roles import read_role, role_data_dir

    prepared = role_prepared_dir(cfg.data, role)
    info, data = read_role(prepared), role_data_dir(prepared)
    if data is None:
        return None, info
    return [ArrowImageDataset(data, s) for s in names], info


def _class_names(ds: ArrowImageDataset, info: dict) -> list[str]:
    """Readable class names (ImageNet: from the class-name file), else the directory names."""
    return list(info.get("class_names") or ds.classes)


def text_tokenizer(mcfg: Config, cfg: Config):
    """The tokenizer the model of `cfg.train.out_dir` (its config `mcfg`) was trained with."""
    from jetformer.data.tokenizer import TextTokenizer, tokenizer_path
    return TextTokenizer(tokenizer_path(mcfg, cfg.train.out_dir))


# ----------------------------------------------------------------------------- measurements
# shared by the stages below and by `jetformer.ablate`, so both compute the same numbers
def generate_samples(model, mcfg: Config, tokenizer, items: list[dict], kind: str, *, e,
                     seed: int, class_names=(), log=None) -> tuple[torch.Tensor, list[str]]:
    """(uint8 images, prompts) for dataset `items` with CFG (`e`: the eval config).
    `kind="t2i"`: one caption of each item (picked with `seed`); `kind="class"`: the items'
    labels, given as the label to a class-conditional model and as `eval.class_prompt` on
    `class_names` to a text model."""
    from jetformer.eval.sampling import (caption_prompts, class_prompt, sample_from_labels,
                                         sample_from_text)
    common = dict(cfg_scale=e.cfg_scale, temperature=e.temperature, batch_size=e.batch_size,
                  seed=seed, log=log)
    if kind == "t2i":
        prompts = caption_prompts(items, seed)
    else:
        labels = [it["label"] for it in items]
        if model.conditioning == "class":
            return sample_from_labels(model, labels, **common), [f"label {y}" for y in labels]
        prompts = [class_prompt(class_names[y], e.class_prompt) for y in labels]
    return sample_from_text(model, tokenizer, prompts, max_text_len=mcfg.tokenizer.max_text_len,
                            **common), prompts


def sample_fidelity(images: torch.Tensor, real: torch.Tensor, extractor: str, judge_path,
                    cfg: Config) -> dict:
    """FID / precision / recall / KID (and its std) of `images` against `real`."""
    from jetformer.eval.fidelity import fidelity_metrics
    return fidelity_metrics(images, real, extractor=extractor, judge_path=judge_path,
                            inception_weights=cfg.eval.inception_weights,
                            batch_size=cfg.eval.batch_size, device=_device(), seed=cfg.seed)


def visible(asked: list[dict], heads) -> list[dict]:
    """`asked` restricted to what the judge can see: a sample asking for a head the judge
    lacks (a source without scene attributes has no shape/colour heads) asks nothing."""
    return [a if all(h in heads for h in a) else {} for a in asked]


def judged_attributes(judge, images: torch.Tensor, asked: list[dict]):
    """(attribute accuracy, per-sample fraction, the judge's predictions) of `images`."""
    from jetformer.eval.attributes import attribute_accuracy
    pred = judge.predict(images)
    return (*attribute_accuracy(pred, asked), pred)


def heldout_nll(model, mcfg: Config, val: ArrowImageDataset, n: int, tokenizer, *,
                batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-image bits/dim of the first `n` val images: given the class or the first caption
    (`bits_per_dim`, as training's val_bits_per_dim), unconditional, and stored as PNG."""
    from jetformer.eval.nll import heldout_bits_per_dim, png_bits_per_dim
    images = val.images(range(n))
    cond = {"labels": val.labels()[:n]} if model.conditioning == "class" else {}
    if model.conditioning == "text":
        first = [(c or [""])[0] for c in val.column("captions")[:n]]
        cond = dict(zip(("text", "text_mask"),
                        tokenizer.encode_batch(first, mcfg.tokenizer.max_text_len)))
    bpd = heldout_bits_per_dim(model, images, batch_size=batch_size, seed=seed, **cond)
    uncond = heldout_bits_per_dim(model, images, batch_size=batch_size, seed=seed)
    return {"bits_per_dim": bpd, "uncond_bits_per_dim": uncond,
            "png_bits_per_dim": png_bits_per_dim(images)}


# ----------------------------------------------------------------------------- judge
def run_judge(cfg: Config, out: str | Path = "models/judge.pt",
              metrics: str | Path = "metrics/judge.json") -> dict:
    """Train the domain judge on the FID reference source's real training images (scene
    attributes, or the class label where a source has none), measure it on its val images,
    save it. A source with neither (COCO) gets no judge: the file records why."""
    from jetformer.eval.judge import (judge_accuracy, judge_targets_reason, save_judge,
                                      save_unavailable, scene_targets, train_judge)

    (train, val), _ = _role_splits(cfg, "fid", "train", "val")
    t0 = time.time()
    targets = {name: [scene_targets(ds[i]) for i in range(len(ds))]
               for name, ds in (("train", train), ("val", val))}
    reason = judge_targets_reason(targets["train"])
    if reason:
        save_unavailable(reason, out)
        result = {"judge_val_accuracy": None, "judge_val_accuracy_unavailable": reason,
                  "judge_trusted": False, "judge_heads": []}
        write_json(metrics, result)
        print(f"judge: not trained ({reason}); the domain feature extractor and attribute "
              "accuracy are unavailable")
        return result
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
def run_sample(cfg: Config, out_dir: str | Path = "data/eval/samples",
               plots: str | Path = "plots") -> dict:
    """Class-conditional and text-to-image samples with CFG for the first `eval.num_samples`
    val items of the FID reference set, saved with what each was asked for (`t2i.pt`,
    `class.pt`), plus sample grids.

    - text-to-image (text models, a captioned reference set): one val caption per image;
    - class samples (a reference set with classes): text models are prompted with
      `eval.class_prompt` ("a {}" -> "a circle"; ImageNet: the class-name file's names),
      class-conditional models get the label; the classes follow the val labels.
    Returns {kind: number of samples}."""
    from jetformer.eval.sampling import make_grid, save_png
    from jetformer.train.checkpoint import atomic_torch_save, load_trained

    model, mcfg = load_trained(cfg.train.out_dir)
    (val,), info = _role_splits(cfg, "fid", "val")
    tokenizer = text_tokenizer(mcfg, cfg) if model.conditioning == "text" else None
    e = cfg.eval
    n = min(e.num_samples, len(val))
    if n < 2:
        raise ValueError(f"eval.num_samples={e.num_samples} with {len(val)} val images gives {n} "
                         "samples; FID/precision/recall need at least 2")
    items = [val[i] for i in range(n)]
    common = dict(e=e, log=lambda s: print(s, flush=True))
    out_dir, plots = Path(out_dir), Path(plots)
    for stale in [out_dir / "t2i.pt", out_dir / "class.pt", plots / "samples" / "t2i.png",
                  plots / "samples" / "class.png"]:
        stale.unlink(missing_ok=True)     # a previous run's samples must not outlive a model change
    t0 = time.time()
    report = {}

    # text-to-image, prompted by val captions
    if model.conditioning == "text" and all(it["captions"] for it in items):
        images, prompts = generate_samples(model, mcfg, tokenizer, items, "t2i", seed=cfg.seed,
                                           **common)
        atomic_torch_save({"images": images, "prompts": prompts, "ids": [it["id"] for it in items],
                           "attributes": [it["attributes"] for it in items]}, out_dir / "t2i.pt")
        save_png(make_grid(images[:64], nrow=8, scale=4), plots / "samples" / "t2i.png")
        report["t2i"] = len(images)
    else:
        print("sample: no text-to-image samples (class-conditional model or a reference set "
              "without captions)")

    # class samples, following the val labels (only where the reference set has classes)
    labels = [it["label"] for it in items]
    if val.classes and all(0 <= y < len(val.classes) for y in labels):
        images, prompts = generate_samples(model, mcfg, tokenizer, items, "class",
                                           seed=cfg.seed + 1, class_names=_class_names(val, info),
                                           **common)
        atomic_torch_save({"images": images, "prompts": prompts, "labels": labels,
                           "classes": val.classes, "ids": [it["id"] for it in items]},
                          out_dir / "class.pt")
        order = sorted(range(len(labels)), key=lambda i: labels[i])[:64]   # grid sorted by class
        save_png(make_grid(images[order], nrow=8, scale=4), plots / "samples" / "class.png")
        report["class"] = len(images)
    else:
        print("sample: no class samples (the reference set has no classes)")
    if not report:
        raise ValueError("sample: the FID reference set (data.roles.fid) has neither captions "
                         "for a text model nor classes: nothing to prompt with")
    print(f"sample: {report} in {time.time() - t0:.0f}s (cfg {e.cfg_scale}, temperature "
          f"{e.temperature})")
    return report


# ----------------------------------------------------------------------------- generation
FIDELITY_KEYS = ("fid", "precision", "recall", "kid", "kid_std")


def run_evaluate_generation(cfg: Config, samples: str | Path = "data/eval/samples",
                            judge: str | Path = "models/judge.pt",
                            metrics: str | Path = "metrics/generation.json",
                            plots: str | Path = "plots") -> dict:
    """FID, precision, recall and KID of the samples against the FID reference set's val
    images (domain judge or Inception, `fidelity.choose_extractor`), and attribute accuracy of
    the samples (does the judge see the shape / colour / class the prompt asked for?), beside
    the trivial baseline of a generator that always draws the most frequent asked value.
    What cannot be measured is null with the reason in `<metric>_unavailable`."""
    from jetformer.eval.attributes import class_asked, t2i_asked
    from jetformer.eval.baselines import constant_attribute_accuracy
    from jetformer.eval.fidelity import choose_extractor
    from jetformer.eval.judge import judge_unavailable, load_judge

    judge_path = judge
    (val,), info = _role_splits(cfg, "fid", "val")
    judge_reason = judge_unavailable(judge_path)
    judge = None if judge_reason else load_judge(judge_path)
    extractor, note = choose_extractor(cfg.eval.feature_extractor, info.get("source", ""),
                                       judge_reason, cfg.eval.inception_weights)
    kinds = [k for k in ("t2i", "class") if (Path(samples) / f"{k}.pt").is_file()]
    if not kinds:
        raise FileNotFoundError(f"no samples in {samples} (run `dvc repro sample`)")
    real = val.images() if extractor else None
    result: dict = {"feature_extractor": extractor or "unavailable", "num_real": len(val),
                    "reference_source": info.get("source", "")}
    if note:
        result["feature_extractor_note"] = note
        print(f"evaluate_generation: {note}", file=sys.stderr)
    rows: list[dict] = []

    def unavailable(key: str, reason: str) -> None:
        result[key], result[f"{key}_unavailable"] = None, reason

    for kind in ("t2i", "class"):
        if kind not in kinds:
            why = ("no text-to-image samples (class-conditional model or uncaptioned reference set)"
                   if kind == "t2i" else "no class samples (the reference set has no classes)")
            for k in (*FIDELITY_KEYS, "attribute_accuracy"):
                unavailable(f"{kind}_{k}", why)
            unavailable(f"baseline_{kind}_attribute_accuracy", why)
            continue
        s = safe_load(Path(samples) / f"{kind}.pt", "samples")
        images = s["images"]
        result[f"{kind}_num_samples"] = len(images)
        if extractor:
            fm = sample_fidelity(images, real, extractor, judge_path, cfg)
            result.update({f"{kind}_{k}": v for k, v in fm.items()})
            print(f"{kind}: FID {fm['fid']:.3f} precision {fm['precision']:.3f} recall "
                  f"{fm['recall']:.3f} KID {fm['kid']:.4f} ({extractor} features)")
        else:
            for k in FIDELITY_KEYS:
                unavailable(f"{kind}_{k}", note)
        if kind == "t2i":
            asked = [t2i_asked(a) for a in s["attributes"]]
        else:
            heads = judge.vocab if judge else ()
            asked = [class_asked(y, s["classes"], heads) for y in s["labels"]]
        asked = visible(asked, judge.vocab) if judge else asked
        if judge is None or not any(asked):
            why = (f"no domain judge ({judge_reason})" if judge is None
                   else "the reference set has no attributes the judge reads for these prompts")
            unavailable(f"{kind}_attribute_accuracy", why)
            unavailable(f"baseline_{kind}_attribute_accuracy", why)
            continue
        acc, per, pred = judged_attributes(judge, images, asked)
        result[f"{kind}_attribute_accuracy"] = acc
        result[f"baseline_{kind}_attribute_accuracy"] = constant_attribute_accuracy(
            [a for a in asked if a])
        for i, a in enumerate(asked):
            rows.append({"kind": kind, "index": i, "id": s["ids"][i], "prompt": s["prompts"][i],
                         **{f"asked_{h}": v for h, v in a.items()},
                         **{f"judged_{h}": pred[h][i] for h in judge.vocab}, "correct": per[i]})
        print(f"{kind}: attribute accuracy {acc:.3f} "
              f"(baseline {result[f'baseline_{kind}_attribute_accuracy']:.3f})")
    # the headline FID/PR/KID: text-to-image samples for text models (COCO-style), else class
    # samples
    main_kind = "t2i" if "t2i" in kinds else "class"
    for k in FIDELITY_KEYS:
        result[k] = result[f"{main_kind}_{k}"]
        if result[k] is None:
            result[f"{k}_unavailable"] = result[f"{main_kind}_{k}_unavailable"]
    result["fid_samples"] = main_kind
    write_metrics(metrics, result)
    write_csv(Path(plots) / "generation_attributes.csv", rows, fields=["index", "correct"])
    return result


# ----------------------------------------------------------------------------- fine-tunes
def run_finetune(cfg: Config, task: str, out_dir: str | Path | None = None,
                 plots: str | Path = "plots") -> dict:
    """A short fine-tune of the trained multimodal model for captioning (image prefix ->
    caption) or VQA (image + question prefix -> answer) on the training split of the task's
    role (`data.roles.caption` / `data.roles.vqa`), saved to `out_dir` (default
    models/finetune_<task>) with `finetune.json`; a class-conditional model or a role without
    the task's texts is saved unchanged with the reason in `skipped`. Returns finetune.json."""
    from jetformer.eval.finetune import finetune, save_finetuned
    from jetformer.train.checkpoint import MODEL_FILE, model_file, load_trained

    out_dir = Path(out_dir or f"models/finetune_{task}")
    model, mcfg = load_trained(cfg.train.out_dir)
    source = safe_load(model_file(cfg.train.out_dir), "model checkpoint")
    splits, role = _role_splits(cfg, task, "train")
    info = {"task": task, "steps": 0, "skipped": "", "source": role.get("source", "")}
    need = "captions" if task == "caption" else "qa"
    if model.conditioning != "text":
        info["skipped"] = "class-conditional model: no text head"
    elif splits is None:
        info["skipped"] = f"no {task} data: {role.get('unavailable')}"
    elif len(splits[0]) == 0 or not splits[0][0][need]:
        info["skipped"] = f"the {task} source '{role.get('source')}' has no {need}"
    curve = []
    if not info["skipped"]:
        tokenizer = text_tokenizer(mcfg, cfg)
        t0 = time.time()
        curve = finetune(model, mcfg, splits[0], tokenizer, task=task,
                         steps=cfg.eval.finetune_steps,
                         lr=cfg.eval.finetune_lr, batch_size=mcfg.train.batch_size, seed=cfg.seed,
                         log=lambda s: print(s, flush=True))
        info.update(steps=len(curve), seconds=time.time() - t0,
                    first_loss=curve[0]["loss"] if curve else None,
                    final_loss=(sum(c["loss"] for c in curve[-10:]) / len(curve[-10:])
                                if curve else None))
    else:
        print(f"finetune {task}: skipped ({info['skipped']}); saving the trained model unchanged")
    save_finetuned(model, source, out_dir / MODEL_FILE,
                   step=int(source.get("step", 0)) + len(curve))
    write_json(out_dir / "finetune.json", info)
    write_csv(Path(plots) / f"finetune_{task}.csv", curve, fields=["step", "loss", "lr"])
    return info


def _finetune_inputs(cfg: Config, model: str | Path, task: str):
    """(the fine-tune's finetune.json, val split, train split of the task's role) for
    `evaluate_caption/vqa`; the splits are None when the fine-tune was skipped."""
    info = read_json(Path(model) / "finetune.json")
    if info.get("skipped"):
        return info, None, None
    splits, _ = _role_splits(cfg, task, "val", "train")
    if splits is None:
        raise ValueError(f"{model} was fine-tuned, but data.roles.{task} now has no data: "
                         f"rerun finetune_{task} (dvc repro)")
    return (info, *splits)


def _load_finetuned(model: str | Path, cfg: Config):
    """(fine-tuned model, its config, its text tokenizer)."""
    from jetformer.train.checkpoint import load_trained
    net, mcfg = load_trained(model)
    return net, mcfg, text_tokenizer(mcfg, cfg)


def _skipped_outputs(info: dict, task: str, metric: str, score_column: str, metrics, plots) -> dict:
    """What `evaluate_<task>` writes when its fine-tune was skipped: null metrics with the reason,
    an empty predictions CSV (with the columns its DVC plot reads)."""
    result = {metric: None, f"baseline_{metric}": None, f"{task}_skipped": info["skipped"],
              f"{metric}_unavailable": info["skipped"],
              f"baseline_{metric}_unavailable": info["skipped"]}
    write_metrics(metrics, result)
    write_csv(Path(plots) / f"{task}_predictions.csv", [], fields=["index", score_column])
    print(f"evaluate_{task}: skipped ({info['skipped']})")
    return result


# ----------------------------------------------------------------------------- caption
def run_evaluate_caption(cfg: Config, model: str | Path = "models/finetune_caption",
                         metrics: str | Path = "metrics/caption.json",
                         plots: str | Path = "plots") -> dict:
    """Greedy captions of the val images by the captioning fine-tune, CIDEr against the val
    captions, beside a constant "most common training caption" baseline."""
    from jetformer.eval.baselines import constant_caption_cider
    from jetformer.eval.cider import cider_score
    from jetformer.eval.finetune import generate_captions

    info, val, train = _finetune_inputs(cfg, model, "caption")
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
              [{"index": i, "id": it["id"], "prediction": p, "cider": per[it["id"]],
                "reference": it["captions"][0]}
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

    info, val, train = _finetune_inputs(cfg, model, "vqa")
    if info.get("skipped"):
        return _skipped_outputs(info, "vqa", "vqa_accuracy", "accuracy", metrics, plots)
    net, mcfg, tokenizer = _load_finetuned(model, cfg)
    t0 = time.time()
    index, ids, questions = [], [], []   # (val item, question): every question of every image
    for i in range(len(val)):
        item = val[i]
        for q in item["qa"]:
            index.append(i)
            ids.append(item["id"])
            questions.append(q)
    images = val.images()[torch.tensor(index, dtype=torch.long)]
    preds = generate_answers(net, tokenizer, images, [q["question"] for q in questions],
                             max_text_len=mcfg.tokenizer.max_text_len,
                             max_len=cfg.eval.max_decode_len, batch_size=cfg.eval.batch_size)
    s = vqa_score(preds, questions)
    train_questions = [q for qas in train.column("qa") for q in (qas or [])]
    base = per_type_vqa_accuracy(train_questions, questions)
    result = {"vqa_accuracy": s["accuracy"], "baseline_vqa_accuracy": base,
              "vqa_per_answer_type": s["per_answer_type"],
              "vqa_per_question_type": s["per_question_type"],
              "vqa_num_questions": len(questions), "vqa_finetune_steps": info.get("steps"),
              "vqa_seconds": time.time() - t0}
    write_metrics(metrics, result)
    write_csv(Path(plots) / "vqa_predictions.csv",
              [{"index": k, "id": i, "question_type": q.get("question_type", ""),
                "question": q["question"],
                "prediction": p, "answers": "|".join(q["answers"]), "accuracy": a}
               for k, (i, q, p, a) in enumerate(zip(ids, questions, preds, s["per_question"]))])
    print(f"VQA accuracy {s['accuracy']:.4f} (most common answer per question type: {base:.4f}); "
          + ", ".join(f"{k} {v:.3f}" for k, v in s["per_answer_type"].items()))
    return result


# ----------------------------------------------------------------------------- understanding
def run_evaluate_understanding(cfg: Config, metrics: str | Path = "metrics/understanding.json",
                               plots: str | Path = "plots") -> dict:
    """Zero-shot classification of the zero-shot role's val images (`data.roles.zeroshot`,
    ImageNet: the class-name file's names) by scoring the class names after the image
    (`eval.zeroshot_prompts`, log-sum-exp over the templates), and the held-out NLL in
    bits/dim of pretraining val images beside the bits/dim of the same images stored as PNG."""
    from jetformer.eval.baselines import majority_class_accuracy
    from jetformer.eval.sampling import class_prompt
    from jetformer.eval.zeroshot import zeroshot_classify
    from jetformer.train.checkpoint import load_trained

    model, mcfg = load_trained(cfg.train.out_dir)
    (pre_val,) = _splits(cfg, "val")
    e = cfg.eval
    t0 = time.time()
    result: dict = {}

    # held-out NLL vs PNG on the same (pretraining val) images: conditional (as training's
    # val_bits_per_dim; the class, or each image's first caption) and unconditional ([NOLABEL])
    n = min(e.num_nll_images, len(pre_val)) if e.num_nll_images else len(pre_val)
    tokenizer = text_tokenizer(mcfg, cfg) if model.conditioning == "text" else None
    nll = heldout_nll(model, mcfg, pre_val, n, tokenizer, batch_size=e.batch_size, seed=cfg.seed)
    bpd, uncond, png = nll["bits_per_dim"], nll["uncond_bits_per_dim"], nll["png_bits_per_dim"]
    result.update(val_bits_per_dim=bpd.mean().item(), val_uncond_bits_per_dim=uncond.mean().item(),
                  png_bits_per_dim=png.mean().item(), nll_num_images=n)
    print(f"held-out NLL {result['val_bits_per_dim']:.4f} bits/dim given the "
          f"{model.conditioning}, {result['val_uncond_bits_per_dim']:.4f} unconditional; PNG "
          f"{result['png_bits_per_dim']:.4f} bits/dim ({n} val images)")

    # zero-shot classification by scoring class names (text models, a role with classes)
    rows = []
    splits, role = _role_splits(cfg, "zeroshot", "val", "train")
    reason = ""
    if model.conditioning != "text":
        reason = "class-conditional model: no text head"
    elif splits is None:
        reason = f"no zero-shot data: {role.get('unavailable')}"
    elif len(splits[0].classes) < 2:
        reason = f"the zero-shot source '{role.get('source')}' has fewer than 2 classes"
    if reason:
        for k in ("zeroshot_accuracy", "baseline_zeroshot_accuracy"):
            result[k], result[f"{k}_unavailable"] = None, reason
        print(f"zero-shot classification: skipped ({reason})")
    else:
        val, train = splits
        images, labels = val.images(), val.labels()
        classes = _class_names(val, role)
        result["baseline_zeroshot_accuracy"] = majority_class_accuracy(train.labels().tolist(),
                                                                       labels.tolist())
        names = [[class_prompt(c, t) for c in classes] for t in e.zeroshot_prompts]  # [P][C]
        encoded = [tokenizer.encode_batch(n, mcfg.tokenizer.max_text_len) for n in names]
        text, mask = (torch.stack(parts) for parts in zip(*encoded))          # [P, C, T] each
        pred, scores = zeroshot_classify(model, images, text, mask, batch_size=e.batch_size)
        result["zeroshot_accuracy"] = (pred == labels).float().mean().item()
        result["zeroshot_source"] = role.get("source", "")
        result["zeroshot_num_classes"] = len(classes)
        result["zeroshot_prompts"] = names if len(classes) <= 50 else [p[:50] for p in names]
        rows = [{"index": i, "label": classes[y], "predicted": classes[p],
                 **({f"logp_{c}": s for c, s in zip(classes, sc)} if len(classes) <= 50 else {})}
                for i, (y, p, sc) in enumerate(zip(labels.tolist(), pred.tolist(),
                                                   scores.tolist()))]
        print(f"zero-shot accuracy {result['zeroshot_accuracy']:.4f} (majority class "
              f"{result['baseline_zeroshot_accuracy']:.4f}), {len(classes)} classes, "
              f"prompts {[p[:3] for p in names]}")
    result["understanding_seconds"] = time.time() - t0
    write_metrics(metrics, result)
    write_csv(Path(plots) / "zeroshot_predictions.csv", rows,
              fields=["index", "label", "predicted"])
    write_csv(Path(plots) / "nll_per_image.csv",
              [{"index": i, "bits_per_dim": b, "uncond_bits_per_dim": u, "png_bits_per_dim": p}
               for i, (b, u, p) in enumerate(zip(bpd.tolist(), uncond.tolist(), png.tolist()))])
    return result


# ----------------------------------------------------------------------------- report
REPORT_PARTS = ("judge", "generation", "caption", "vqa", "understanding", "inspect")
REPORT_ARTIFACTS = ("samples", "generation_attributes.csv", "caption_predictions.csv",
                    "vqa_predictions.csv", "zeroshot_predictions.csv", "nll_per_image.csv",
                    "finetune_caption.csv", "finetune_vqa.csv", "inspect",
                    "inspect_roundtrip.csv")


def run_eval_report(cfg: Config, metrics_dir: str | Path = "metrics", plots: str | Path = "plots",
                    out: str | Path = "metrics/eval.json",
                    train_metrics: str | Path = "metrics/train.json") -> dict:
    """Check every evaluation stage's metrics against the trivial baselines, log them, the
    sample grids and the per-example predictions to a new MLflow evaluation run nested under
    the training's run (best effort), and write the summary `out` (`report_metrics`)."""
    from jetformer.eval.report import (log_evaluation, merge_results, report_metrics,
                                       training_run_id)

    merged = merge_results({p: read_json(Path(metrics_dir) / f"{p}.json") for p in REPORT_PARTS})
    numeric = {k: v for k, v in merged.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
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
        print(f"  {k:40s} {numeric[k]:.4f}"
              if isinstance(numeric[k], float) else f"  {k:40s} {numeric[k]}")
    print("beats baselines: " + ", ".join(f"{k.removeprefix('beats_')} {'yes' if v else 'NO'}"
                                          for k, v in summary.items() if k.startswith("beats_")))
    if run_id:
        print(f"logged to MLflow evaluation run {run_id} (training run "
              f"{training_run_id(train_metrics) or 'unknown'})")
    return {**merged, **summary}
