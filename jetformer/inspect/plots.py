"""Figures of the inspection tools (matplotlib, Agg backend), written atomically as PNG."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def _figure(rows: int, cols: int, cell: float = 1.6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _save(fig, path: str | Path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, 0o644)                        # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def likelihood_figure(images: torch.Tensor, pnll, path: str | Path, names=None) -> Path:
    """One row per image: the image, then bits/dim per patch of the total and of each part."""
    from .likelihood import PARTS
    parts = ("total",) + PARTS
    fig, axes = _figure(len(images), 1 + len(parts), cell=2.0)
    for i, img in enumerate(images.cpu().numpy()):
        axes[i, 0].imshow(img, interpolation="nearest")
        axes[i, 0].set_title(f"{names[i] if names else 'image'}\n{float(pnll.bits_per_dim[i]):.3f}"
                             " bits/dim", fontsize=7)
        for j, part in enumerate(parts, start=1):
            m = pnll.maps(part)[i].numpy()
            im = axes[i, j].imshow(m, cmap="magma", interpolation="nearest")
            axes[i, j].set_title(f"{part}: mean {m.mean():.3f}", fontsize=7)
            cb = fig.colorbar(im, ax=axes[i, j], fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=6)
    fig.suptitle("bits per dim of each patch (mean of the total = the image's bits/dim)",
                 fontsize=8)
    return _save(fig, path)


def cells_figure(rows: list[list[tuple[str, torch.Tensor]]], path: str | Path,
                 title: str = "") -> Path:
    """A grid of labelled uint8 images [H, W, 3]: `rows` of (label, image) cells."""
    cols = max(len(r) for r in rows)
    fig, axes = _figure(len(rows), cols)
    for i, row in enumerate(rows):
        for j, (label, img) in enumerate(row):
            axes[i, j].imshow(np.asarray(img), interpolation="nearest")
            axes[i, j].set_title(label, fontsize=6)
        for j in range(len(row), cols):
            axes[i, j].axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def completion_cells(images: torch.Tensor, completion) -> list[list[tuple[str, torch.Tensor]]]:
    """Rows of (input, kept rows only, samples..., drift of sample 1 x10) cells per image."""
    rows, r = [], completion.kept_pixel_rows
    for i, img in enumerate(images.cpu()):
        kept = img.clone()
        kept[r:] = 128
        row = [("input", img), (f"kept: {r} px rows", kept)]
        for s, sample in enumerate(completion.samples[i]):
            mean = float(completion.drift["mean_abs_px"][i, s])
            row.append((f"sample {s + 1}\nkept drift {mean:.2f} px", sample))
        diff = (completion.samples[i, 0].int() - img.int()).abs()
        diff[r:] = 0
        diff = (diff * 10).clamp(0, 255).to(torch.uint8)
        row.append(("|sample 1 - input|\nx10, kept rows", diff))
        rows.append(row)
    return rows
