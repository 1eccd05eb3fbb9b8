"""Sample grids during training: for a few val captions (or classes), the real image followed by
samples drawn with CFG, one row per prompt under its caption (grids under `plots/`: the `train`
stage's `train_samples` plot in dvc.yaml)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from jetformer.models.jetformer import JetFormer


def tile(rows: list[torch.Tensor], labels: list[str] | None = None, scale: int = 4,
         gap: int = 2, label_height: int = 14) -> Image.Image:
    """rows: each uint8 [n, H, W, 3] (same H, W, n) -> one image, nearest-upscaled by `scale`,
    white gaps between cells, and `labels[r]` written above row r."""
    n, H, W, _ = rows[0].shape
    h, w = H * scale, W * scale
    band = label_height if labels else 0
    canvas = np.full((len(rows) * (h + gap + band) + gap, n * (w + gap) + gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(n):
            cell = row[c].cpu().numpy().repeat(scale, 0).repeat(scale, 1)
            y, x = gap + band + r * (h + gap + band), gap + c * (w + gap)
            canvas[y:y + h, x:x + w] = cell
    image = Image.fromarray(canvas)
    if labels:
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        for r, text in enumerate(labels):
            draw.text((gap + 1, r * (h + gap + band) + 1), text, fill=(0, 0, 0), font=font)
    return image


@torch.no_grad()
def sample_grid(model: JetFormer, items: list[dict], tokenizer, max_text_len: int,
                samples_per_prompt: int, cfg_scale: float, temperature: float,
                generator: torch.Generator) -> tuple[bytes, str]:
    """PNG bytes of the grid and a text listing of its rows (`row: prompt`)."""
    k = samples_per_prompt
    if model.conditioning == "class":
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        images = model.sample_images(labels=labels.repeat_interleave(k).to(model.device),
                                     cfg_scale=cfg_scale, temperature=temperature,
                                     generator=generator)
        prompts = [f"class {int(l)}" for l in labels]
    else:
        prompts = [it["captions"][0] for it in items]
        text, mask = tokenizer.encode_batch(prompts, max_text_len)
        images = model.sample_images(text=text.repeat_interleave(k, 0).to(model.device),
                                     text_mask=mask.repeat_interleave(k, 0).to(model.device),
                                     cfg_scale=cfg_scale, temperature=temperature,
                                     generator=generator)
    images = images.view(len(items), k, *images.shape[1:])                     # [P, k, H, W, 3]
    rows = [torch.cat([it["image"][None], images[i].cpu()]) for i, it in enumerate(items)]
    buf = io.BytesIO()
    tile(rows, labels=prompts).save(buf, format="PNG")
    listing = "".join(f"row {i}: {p}  (first column: the real val image)\n"
                      for i, p in enumerate(prompts))
    return buf.getvalue(), listing
