"""PCA of patches: orthonormal components sorted by variance, exact reconstruction with all of
them, truncation error = the dropped variance, `patchify` layout, save/load checks."""
import numpy as np
import pytest
import torch

from jetformer.data.pca import fit_pca, image_patches, load_pca, save_pca
from jetformer.data.synthetic import render_scene, sample_scene
from jetformer.models.jet import patchify


@pytest.fixture(scope="module")
def images():
    out = []
    for i in range(24):
        rng = np.random.default_rng(i)
        out.append(np.asarray(render_scene(sample_scene(rng), 16, 16, rng)))
    return np.stack(out)                                                     # [24, 16, 16, 3] uint8


def test_components_orthonormal_sorted_and_reconstruct(images):
    pca = fit_pca(images, 4)
    C, mean, ev = (pca["components"].double(), pca["mean"].double(),
                   pca["explained_variance"].double())
    assert C.shape == (48, 48) and mean.shape == ev.shape == (48,) and pca["patch_size"] == 4
    assert pca["components"].dtype == torch.float32
    assert torch.allclose(C @ C.T, torch.eye(48, dtype=torch.float64), atol=1e-5)
    assert (ev[:-1] >= ev[1:]).all() and ev[0] > 10 * ev[16]
    x = torch.from_numpy(image_patches(images, 4))                         # [24*16, 48] model space
    assert x.min() >= -1 and x.max() <= 1
    z = (x - mean) @ C.T                                                      # coordinates
    assert torch.allclose(z @ C + mean, x, atol=1e-5)                        # all components: exact
    assert torch.allclose(z.var(0), ev, rtol=1e-3, atol=1e-6)              # variance along each row
    k = 8
    err = ((z[:, :k] @ C[:k] + mean - x) ** 2).sum(1).mean()
    assert torch.allclose(err, ev[k:].sum() * (len(x) - 1) / len(x), rtol=1e-3)
    rand = torch.linalg.qr(torch.randn(48, k, dtype=torch.float64))[0].T    # any other k directions
    err_rand = ((((x - mean) @ rand.T) @ rand + mean - x) ** 2).sum(1).mean()
    assert err < err_rand


def test_patch_layout_is_patchify(images):
    x = torch.from_numpy(images).double() / 127.5 - 1
    expected = patchify(x, 4).reshape(-1, 48).numpy()
    np.testing.assert_array_equal(image_patches(images, 4), expected)
    # first patch of the first image, by hand: rows 0..3, columns 0..3, (row, col, colour) order
    hand = (images[0, :4, :4, :].astype(np.float64) / 127.5 - 1).reshape(-1)
    np.testing.assert_array_equal(image_patches(images, 4)[0], hand)


def test_save_load_checks(images, tmp_path):
    pca = fit_pca(images, 2)
    save_pca(pca, tmp_path / "pca" / "pca.pt")
    back = load_pca(tmp_path / "pca" / "pca.pt", patch_size=2)
    assert torch.equal(back["components"], pca["components"]) and back["patch_size"] == 2
    with pytest.raises(ValueError, match="patch size 2.*model.patch_size = 4"):
        load_pca(tmp_path / "pca" / "pca.pt", patch_size=4)
    with pytest.raises(FileNotFoundError, match="fit_pca"):
        load_pca(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="too few"):
        fit_pca(images[:1, :4, :4], 4)
