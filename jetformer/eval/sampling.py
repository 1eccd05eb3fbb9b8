"""Batched sampling for evaluation and the CLI: text-to-image and class-conditional samples
with classifier-free guidance (KV cache inside `JetFormer.sample_images`), and sample grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from jetformer.progress import progress
from jetformer.safe_io import atomic_save_png


def class_prompt(name: str, template: str) -> str:
    """The text that asks a multimodal model for a class, e.g. template "a {}" -> "a circle"."""
    if "{}" not in template:
        raise ValueError(f"eval.class_prompt must contain '{{}}' for the class name, got "
                         f"{template!r}")
    return template.format(name.replace("_", " "))


def caption_prompts(items: list[dict], seed: int) -> list[str]:
    """One text-to-image prompt per dataset item: one of its captions, picked with `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [it["captions"][int(torch.randint(len(it["captions"]), (), generator=g))]
            for it in items]


@torch.no_grad()
def sample_from_text(model, tokenizer, prompts: list[str], *, max_text_len: int, cfg_scale: float,
                     temperature: float, batch_size: int, seed: int = 0, log=None) -> torch.Tensor:
    """uint8 [len(prompts), H, W, 3]: one sample per prompt (repeat a prompt for more)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for i in progress(range(0, len(prompts), batch_size), "sample (text)"):
        text, mask = tokenizer.encode_batch(prompts[i:i + batch_size], max_text_len)
        out.append(model.sample_images(text=text.to(model.device), text_mask=mask.to(model.device),
                                       cfg_scale=cfg_scale, temperature=temperature,
                                       generator=g).cpu())
        if log is not None:
            log(f"sampled {min(i + batch_size, len(prompts))}/{len(prompts)} (text)")
    return torch.cat(out)


@torch.no_grad()
def sample_from_labels(model, labels: list[int], *, cfg_scale: float, temperature: float,
                       batch_size: int, seed: int = 0, log=None) -> torch.Tensor:
    """uint8 [len(labels), H, W, 3] from a class-conditional model."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for i in progress(range(0, len(labels), batch_size), "sample (class)"):
        y = torch.tensor(labels[i:i + batch_size], dtype=torch.long, device=model.device)
        out.append(model.sample_images(labels=y, cfg_scale=cfg_scale, temperature=temperature,
                                       generator=g).cpu())
        if log is not None:
            log(f"sampled {min(i + batch_size, len(labels))}/{len(labels)} (class)")
    return torch.cat(out)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2,
              scale: int = 1) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, 3] mosaic (grey
    padding)."""
    n, h, w, _ = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 128, np.uint8)
    for k, img in enumerate(images.cpu().numpy()):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + c * (w + pad): pad + c * (w + pad) + w] = img
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Atomic PNG write."""
    atomic_save_png(array, path)
