"""Held-out NLL in bits/dim, beside the bits/dim of the same images stored as PNG.

The model's number is `JetFormer.image_bits_per_dim` (no curriculum noise; all constants of
dequantisation and [-1, 1] scaling accounted, paper §3.1). Two numbers, never to be confused:
conditional (given the class or a caption, as training's `val_bits_per_dim`) and unconditional
(the [NOLABEL] prefix, `val_uncond_bits_per_dim`: comparable with PNG, which knows no label).
PNG is the lossless-codec reference: bits of the PNG file (zlib level 9) / (H·W·3).
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from jetformer.progress import progress


def png_bits_per_dim(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W,3] -> [N] bits/dim of each image as a PNG file (RGB, zlib level 9)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N,H,W,3], got {images.dtype} "
                         f"{tuple(images.shape)}")
    out = []
    for img in images.cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(buf, format="PNG",
                                                                    optimize=True,
                                                                     compress_level=9)
        out.append(8.0 * buf.getbuffer().nbytes / img.size)
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def heldout_bits_per_dim(model, images: torch.Tensor, *, batch_size: int = 50, seed: int = 0,
                         labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
                         text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N,H,W,3] -> [N] model bits/dim (fixed dequantisation noise seed): conditioned on
    `labels` [N] or `text`/`text_mask` [N, T] when given, else unconditional."""
    for name, v in (("labels", labels), ("text", text), ("text_mask", text_mask)):
        if v is not None and len(v) != len(images):
            raise ValueError(f"heldout_bits_per_dim: {name} has {len(v)} rows for "
                             f"{len(images)} images")
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in progress(range(0, len(images), batch_size), "nll"):
        sl = slice(i, i + batch_size)
        cond = {k: None if v is None else v[sl].to(device)
                for k, v in (("labels", labels), ("text", text), ("text_mask", text_mask))}
        out.append(model.image_bits_per_dim(images[sl].to(device), generator=g, **cond)
                   .double().cpu())
    return torch.cat(out)
