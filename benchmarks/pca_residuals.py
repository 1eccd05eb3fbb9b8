"""What the diagonal Gaussian over the PCA-factored dims costs (paper §3.2 / App. B: the dims
factored out before the flow are "modelled with a Gaussian distribution", as in probabilistic PCA).

    python benchmarks/pca_residuals.py [--preset experiments/presets/table2.yaml]
                                       [--val-images 500] [--bin-frac 0.25]

Fits PCA on the first `pca.num_images` training images of the preset's prepared data (the
`fit_pca` stage's own function), dequantises held-out val patches as the model does (x + u,
u ~ U(0, 1/127.5)) and scores the `3p² - model.factored_dims` factored-out PCA coordinates under
three per-dimension models fitted on the training patches:

  gaussian    the `pca` variant's prior at init (`pca_prior_init`: maximum likelihood from
              the fitted variances plus the dequantisation variance)
  laplace     median and mean absolute deviation
  histogram   a per-dimension histogram density (bins of `--bin-frac` × the dequantisation
              width, add-half smoothing): about the best any per-dimension marginal can do

Numbers are bits per image dimension (the sum over the factored dims divided by 3p², the unit
of the model's bits/dim; offsets that are common to all three models cancel in the
differences), with the median kurtosis of the factored coordinates (3 for a Gaussian). Writes
benchmarks/results/pca_residuals.json (atomically).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config  # noqa: E402
from jetformer.data.dataset import ArrowImageDataset  # noqa: E402
from jetformer.data.pca import image_patches  # noqa: E402
from jetformer.data.stages import fit_train_pca  # noqa: E402
from jetformer.models.factoring import PIXEL_SCALE, pca_prior_init  # noqa: E402
from jetformer.safe_io import atomic_write_json  # noqa: E402

LN2 = math.log(2.0)


def pca_coordinates(images: np.ndarray, pca: dict, mean: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Dequantised patches in the PCA basis, centred on the model's `mean`, [M, 3p²]."""
    x = image_patches(images, pca["patch_size"])
    x = x + rng.uniform(0.0, 1.0 / PIXEL_SCALE, size=x.shape)
    return (x - mean) @ pca["components"].double().numpy().T


def gaussian_nats(test: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    return 0.5 * np.log(2 * np.pi) + log_scale + 0.5 * test ** 2 * np.exp(-2 * log_scale)


def laplace_nats(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    loc = np.median(train, 0)
    scale = np.abs(train - loc).mean(0)
    return np.log(2 * scale) + np.abs(test - loc) / scale


def histogram_nats(train: np.ndarray, test: np.ndarray, width: float) -> np.ndarray:
    out = np.empty_like(test)
    for j in range(train.shape[1]):
        lo = min(train[:, j].min(), test[:, j].min()) - width
        edges = np.arange(lo, max(train[:, j].max(), test[:, j].max()) + 2 * width, width)
        counts, _ = np.histogram(train[:, j], edges)
        p = (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
        idx = np.clip(np.digitize(test[:, j], edges) - 1, 0, len(counts) - 1)
        out[:, j] = -np.log(p[idx] / width)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="experiments/presets/table2.yaml")
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--bin-frac", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/pca_residuals.json"))
    args = p.parse_args(argv)
    cfg = load_config(REPO / "params.yaml", overlays=[args.preset] if args.preset else [],
                      overrides=["pca.enabled=true"])
    if not (Path(cfg.data.prepared_dir) / "metadata.json").is_file():
        raise SystemExit(f"{cfg.data.prepared_dir}: no prepared data for preset {args.preset}; "
                         "`python -m jetformer ablate --preset table2` prepares the photo world "
                         "on first use, `dvc repro prepare` the default one (--preset '')")
    pca, n_train = fit_train_pca(cfg)
    val = ArrowImageDataset(cfg.data.prepared_dir, "val")
    n_val = min(args.val_images, len(val))
    d = cfg.model.factored_dims
    mean, log_scale = (t.double().numpy() for t in pca_prior_init(pca, d))
    rng = np.random.default_rng(args.seed)
    train = pca_coordinates(ArrowImageDataset(cfg.data.prepared_dir, "train")
                            .images(range(n_train)).numpy(), pca, mean, rng)
    test = pca_coordinates(val.images(range(n_val)).numpy(), pca, mean, rng)
    dim = train.shape[1]
    rest_train, rest_test = train[:, d:], test[:, d:]

    def bits(nats: np.ndarray) -> float:   # per image dim: sum over dims / 3p², mean over patches
        return float(nats.sum(1).mean() / dim / LN2)

    centred = rest_train - rest_train.mean(0)
    kurt = (centred ** 4).mean(0) / centred.var(0) ** 2
    scores = {"gaussian": bits(gaussian_nats(rest_test, log_scale)),
              "laplace": bits(laplace_nats(rest_train, rest_test)),
              "histogram": bits(histogram_nats(rest_train, rest_test,
                                               args.bin_frac / PIXEL_SCALE))}
    report = {
        "preset": args.preset, "prepared_dir": str(cfg.data.prepared_dir),
        "train_images": n_train, "val_images": n_val, "patch_size": pca["patch_size"],
        "patch_dims": dim, "kept_dims": d, "factored_dims": dim - d,
        "bits_per_image_dim": scores,
        "gaussian_minus_histogram": scores["gaussian"] - scores["histogram"],
        "gaussian_minus_laplace": scores["gaussian"] - scores["laplace"],
        "kurtosis_median": float(np.median(kurt)), "kurtosis_max": float(kurt.max()),
    }
    atomic_write_json(args.out, report)
    print(report)
    return report


if __name__ == "__main__":
    main()
