"""Short captioning / VQA fine-tunes of a trained multimodal JetFormer (paper §4, Table 4 setup,
scaled down): image-first rows only, [BOI, img, BOS, text], loss on the text (captioning) or on
the answer tokens and EOS only (VQA: the question is prefix). The flow gets no gradient
(stop-gradient at the flow output on image-first rows), so only the decoder and heads move.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from jetformer.data.batching import caption_batch, vqa_batch
from jetformer.progress import progress
from jetformer.train.checkpoint import atomic_torch_save
from jetformer.train.optim import build_optimizer, clip_gradients, lr_at

TASKS = ("caption", "vqa")


def finetune(model, cfg, dataset, tokenizer, *, task: str, steps: int, lr: float, batch_size: int,
             seed: int = 0, log=print, log_every: int = 25) -> list[dict]:
    """Fine-tune `model` in place on `dataset` (ArrowImageDataset items) for `steps` updates of
    `batch_size` random items. AdamW as in training (decoupled wd, grad clip), lr warm-up 10%
    then cosine. Returns the loss curve [{"step", "loss", "lr"}] (loss in nats per text token)."""
    if task not in TASKS:
        raise ValueError(f"fine-tune task must be one of {TASKS}, got {task!r}")
    if getattr(model, "text_head", None) is None:
        raise ValueError("fine-tuning for captioning/VQA needs a text model "
                         "(model.conditioning='text')")
    if cfg.train.text_loss_weight <= 0:
        raise ValueError("train.text_loss_weight must be > 0 to read the text loss from "
                         "compute_loss")
    if steps <= 0:
        return []
    make_batch = caption_batch if task == "caption" else vqa_batch
    torch.manual_seed(seed + 2)   # dropout masks come from the global RNG: without this the
    # fine-tune would depend on whatever drew from it before (imports, model loading)
    g = torch.Generator().manual_seed(seed)                                  # data (CPU)
    step_gen = torch.Generator(device=model.device).manual_seed(seed + 1)   # dequantisation noise
    opt = build_optimizer(model, dataclasses.replace(cfg.train, lr=lr))
    max_len = cfg.tokenizer.max_text_len
    curve, t0 = [], time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, base_lr=lr, total_steps=steps, warmup_frac=0.1)
        idx = torch.randint(len(dataset), (min(batch_size, len(dataset)),), generator=g).tolist()
        batch = make_batch([dataset[i] for i in idx], tokenizer, max_len, g)
        batch["image_first"] = torch.ones(len(idx), dtype=torch.bool)
        out = model.compute_loss(batch, sigma_rgb=0.0, train=True, generator=step_gen)
        loss = out["loss"] / cfg.train.text_loss_weight          # nats per text token
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model.parameters(), cfg.train.grad_clip)
        opt.step()
        curve.append({"step": step + 1, "loss": float(loss.detach()),
                      "lr": opt.param_groups[0]["lr"]})
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"finetune {task} step {step + 1}/{steps} loss {curve[-1]['loss']:.4f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    return curve


def save_finetuned(model, source: dict, out_file, step: int) -> None:
    """Write the fine-tuned model in the export format `load_trained` reads (`model.pt`),
    keeping the source checkpoint's config, vocabulary, classes and PCA."""
    atomic_torch_save({"format": source["format"], "config": source["config"],
                       "vocab_size": source["vocab_size"], "num_classes": source["num_classes"],
                       "pca": source.get("pca"), "step": step,
                       "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       "ema": None}, out_file)


@torch.no_grad()
def generate_captions(model, tokenizer, images: torch.Tensor, *, max_len: int,
                      batch_size: int) -> list[str]:
    """Greedy captions of uint8 images [N,H,W,3]."""
    out = []
    for i in progress(range(0, len(images), batch_size), "caption"):
        ids = model.generate_text(images[i:i + batch_size].to(model.device), max_len=max_len)
        out.extend(tokenizer.decode(row) for row in ids.cpu())
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, images: torch.Tensor, questions: list[str], *,
                     max_text_len: int,
                     max_len: int, batch_size: int) -> list[str]:
    """Greedy answers: prefix [BOI, img, BOS, question] (question ids without EOS, as in
    `batching.vqa_batch`); images uint8 [N,H,W,3], one question each. Questions of different
    lengths are LEFT-padded (right-aligned, as the official sampler does): decoding continues
    from the last prefix position, which must be a real token."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    out = []
    for i in progress(range(0, len(images), batch_size), "answer"):
        qs = questions[i:i + batch_size]
        prefix = torch.zeros(len(qs), max_text_len, dtype=torch.long)
        for b, q in enumerate(qs):
            ids = tokenizer.encode(q, eos=False)[: max_text_len - 1]
            prefix[b, max_text_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
        ids = model.generate_text(images[i:i + batch_size].to(model.device),
                                  prefix=prefix.to(model.device),
                                  prefix_mask=(prefix != 0).to(model.device), max_len=max_len)
        out.extend(tokenizer.decode(row) for row in ids.cpu())
    return out
