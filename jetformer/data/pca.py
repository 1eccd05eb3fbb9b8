"""PCA of training patches for the PCA-factoring variant (paper §4, Table 2 "PCA factoring":
W from a PCA of patches of 4,000 training images, scikit-learn, no whitening).

The saved dict (api.md `jetformer.models.factoring`):
`{"components": [3p², 3p²] float32, rows orthonormal, by decreasing explained variance,
  "mean": [3p²], "explained_variance": [3p²], "patch_size": p}`.
Patches are flattened by `jetformer.models.jet.patchify` (row in patch, column in patch,
channel) from images in model space x = I/127.5 − 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jetformer.models.jet import patchify
from jetformer.safe_io import atomic_torch_save, safe_load


def image_patches(images_uint8: np.ndarray, p: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> model-space patches float64 [N·(H/p)·(W/p), 3p²] (`patchify` order)."""
    x = torch.from_numpy(np.asarray(images_uint8)).double() / 127.5 - 1.0   # [N, H, W, 3]
    return patchify(x, p).reshape(-1, 3 * p * p).numpy()


def fit_pca(images_uint8: np.ndarray, patch_size: int) -> dict:
    """Full PCA (all 3p² components) of the images' patches; see the module docstring."""
    from sklearn.decomposition import PCA     # (2 s to import: only the stage that fits it)
    patches = image_patches(images_uint8, patch_size)                     # [M, 3p²]
    if patches.shape[0] < patches.shape[1]:
        raise ValueError(f"{patches.shape[0]} patches are too few for "
                         f"{patches.shape[1]} components")
    pca = PCA(n_components=patches.shape[1], whiten=False, svd_solver="full").fit(patches)
    return {"components": torch.from_numpy(pca.components_.astype(np.float32)),  # rows = directions
            "mean": torch.from_numpy(pca.mean_.astype(np.float32)),
            "explained_variance": torch.from_numpy(pca.explained_variance_.astype(np.float32)),
            "patch_size": int(patch_size)}


def save_pca(pca: dict, path: str | Path) -> None:
    """Write the PCA dict (plain tensors and an int) atomically."""
    atomic_torch_save(pca, path)


def load_pca(path: str | Path, patch_size: int | None = None) -> dict:
    """Load and check a dict written by `save_pca` (clear errors instead of silent fallbacks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PCA file {path} not found: set pca.enabled: true and run the "
                                "`fit_pca` stage (dvc repro fit_pca)")
    pca = safe_load(path, "PCA file")
    if not isinstance(pca, dict) or not {"components", "mean", "patch_size"} <= set(pca):
        raise ValueError(f"{path}: not a PCA file (expected a dict with components, mean, "
                         "patch_size)")
    p = pca["patch_size"]
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"{path}: patch_size {p!r} is not a positive integer")
    if patch_size is not None and p != patch_size:
        raise ValueError(f"{path}: fitted for patch size {p}, but model.patch_size = {patch_size}; "
                         "rerun fit_pca")
    d = 3 * p * p
    if not (torch.is_tensor(pca["components"]) and torch.is_tensor(pca["mean"])):
        raise ValueError(f"{path}: components and mean must be tensors")
    if tuple(pca["components"].shape) != (d, d) or tuple(pca["mean"].shape) != (d,):
        raise ValueError(f"{path}: components {tuple(pca['components'].shape)} / mean "
                         f"{tuple(pca['mean'].shape)} do not match 3p² = {d}")
    return pca
