"""DVC stage `fit_pca`: when `pca.enabled`, fit PCA on patches of `pca.num_images` training
images and save it to `pca.out_path`; otherwise only say so (the stage's output directory
then holds a note instead of the file)."""
import argparse
import sys
from pathlib import Path

from jetformer.config import ConfigError, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.data.pca import fit_pca, save_pca


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
    except ConfigError as e:
        print(f"fit_pca failed: {e}", file=sys.stderr)
        return 1
    out = Path(cfg.pca.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    note_path = out.parent / "DISABLED.txt"
    for stale in (out, note_path):            # what an earlier run of this stage left
        stale.unlink(missing_ok=True)
    if not cfg.pca.enabled:
        note = "pca.enabled is false: no PCA fitted (set it true for model.factoring=pca)\n"
        note_path.write_text(note)
        print("fit_pca: " + note.strip())
        return 0
    ds = ArrowImageDataset(cfg.data.prepared_dir, "train")
    n = min(cfg.pca.num_images, len(ds))
    images = ds.images(range(n)).numpy()                          # [N, H, W, 3] uint8
    pca = fit_pca(images, cfg.model.patch_size)
    save_pca(pca, out)
    ev = pca["explained_variance"].numpy()
    keep = cfg.model.factored_dims
    print(f"fit_pca: {n} images, {images.shape[0] * cfg.num_image_tokens} patches; the first "
          f"{keep} of {len(ev)} components explain {ev[:keep].sum() / ev.sum():.1%} of the variance "
          f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
