"""ImageCodec: every factoring variant is invertible, lossless, scores each dim exactly once,
and reports the exact log-det of its (square) map x -> [tokens, rest]."""
import math

import pytest
import torch

from jetformer.config import REPO_ROOT, load_config
from jetformer.models.factoring import ImageCodec
from jetformer.models.jet import patchify
from jetformer.noise import from_model_space, to_model_space

VARIANTS = {
    "post_flow": [],
    "learnable_w": ["model.factoring=learnable_w"],
    "pca": ["model.factoring=pca", "pca.enabled=true"],
    "none": ["model.factoring=none"],
    "no_flow": ["model.factoring=no_flow"],
}


def variant_overrides(name, token_dim):
    extra = [f"model.factored_dims={token_dim}"] if name in ("none", "no_flow") else []
    return VARIANTS[name] + extra


def random_pca(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return {"components": q.T.float(), "mean": 0.1 * torch.randn(dim, generator=g),
            "explained_variance": torch.linspace(1.0, 0.01, dim)}


def codec_of(cfg, pca=None):
    """The ImageCodec of a full Config (as `JetFormer.from_config` builds it)."""
    return ImageCodec(cfg.model, cfg.data.resolution, cfg.seed, pca=pca)


def build(cfg, randomize=None, seed=0):
    torch.manual_seed(seed)
    codec = codec_of(cfg, random_pca(cfg.token_dim) if cfg.model.factoring == "pca" else None)
    if randomize is not None:
        randomize(codec, out_std=0.05 if cfg.model.flow.num_couplings > 4 else 0.2)
    return codec.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_logdet_equals_log_abs_det_jacobian(variant, make_cfg, randomize):
    cfg = make_cfg("data.resolution=4", *variant_overrides(variant, 12))  # 4 tokens x 12 dims
    codec = build(cfg, randomize).double()

    def full_map(v):                                                  # square: 48 -> 48
        tokens, rest, _ = codec.encode(v.view(1, 4, 4, 3))
        return torch.cat([tokens, rest], dim=-1).flatten()

    x = torch.rand(1, 4, 4, 3, dtype=torch.float64) * 2 - 1
    tokens, rest, logdet = codec.encode(x)
    assert tokens.shape[-1] + rest.shape[-1] == 12                    # every dim exactly once
    jac = torch.autograd.functional.jacobian(full_map, x.flatten())
    expected = torch.linalg.slogdet(jac).logabsdet.item()
    assert logdet.item() == pytest.approx(expected, abs=1e-8)
    if variant != "no_flow":
        assert abs(expected) > 0.1                                     # a real volume change


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lossless_round_trip_default_shapes(variant, randomize):
    """uint8 -> model space -> encode -> decode -> uint8 is exact, at the default 32x32, p=4,
    16-coupling flow with perturbed (non-identity) weights."""
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=variant_overrides(variant, 48))
    codec = build(cfg, randomize)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g)
    x = to_model_space(images, dequantize=False)
    with torch.no_grad():
        tokens, rest, logdet = codec.encode(x)
        assert tokens.shape == (4, 64, codec.factored_dims)
        assert rest.shape == (4, 64, 48 - codec.factored_dims)
        if variant != "no_flow":
            assert (patchify(x, 4)[..., :codec.factored_dims] - tokens).abs().max() > 0.1
        x_back = codec.decode(tokens, rest)
    assert (x_back - x).abs().max() < 1e-4
    assert torch.equal(from_model_space(x_back), images)


@pytest.mark.parametrize("variant", ["post_flow", "learnable_w", "pca", "none"])
def test_modelled_dims_depend_on_all_input_channels(variant, randomize):
    """Each token the transformer sees depends on every pixel channel of its patch
    (default p=4, d=16, 16 couplings; 8x8 images keep the Jacobian small)."""
    cfg = load_config(REPO_ROOT / "params.yaml",
                      overrides=["data.resolution=8", "model.flow.width=16",
                                 "model.flow.mlp_dim=32", *variant_overrides(variant, 48)])
    codec = build(cfg, randomize).double()
    x = torch.rand(1, 8, 8, 3, dtype=torch.float64) * 2 - 1
    jac = torch.autograd.functional.jacobian(lambda v: codec.encode(v)[0], x)  # [1,4,d,1,8,8,3]
    d = codec.factored_dims
    jac = jac[0, :, :, 0].reshape(4, d, 2, 4, 2, 4, 3)                 # [n, d, h, p, w, p, C]
    for n in range(4):
        block = jac[n, :, n // 2, :, n % 2]                            # token n wrt its own patch
        assert (block.abs() > 1e-9).all(), f"token {n}: some modelled dim ignores a channel"


def test_no_flow_tokens_are_raw_patches(make_cfg):
    codec = build(make_cfg(*variant_overrides("no_flow", 12)))
    assert codec.flow is None and len(list(codec.parameters())) == 0
    x = torch.rand(2, 8, 8, 3) * 2 - 1
    tokens, rest, logdet = codec.encode(x)
    assert torch.equal(tokens, patchify(x, 2)) and rest.shape == (2, 16, 0)
    assert torch.equal(logdet, torch.zeros(2))
    assert torch.equal(codec.prior_nll(rest), torch.zeros(2))


def test_prior_nll_is_standard_normal(tiny_cfg):
    """post_flow: the flow scales the factored-out dims itself, so their prior is N(0, I)."""
    codec = build(tiny_cfg)
    rest = torch.randn(3, 16, 8)
    expected = -torch.distributions.Normal(0.0, 1.0).log_prob(rest).sum(dim=(1, 2))
    assert torch.allclose(codec.prior_nll(rest), expected, atol=1e-4)
    assert codec.prior_nll(torch.zeros(1, 16, 8)).item() == pytest.approx(
        0.5 * math.log(2 * math.pi) * 16 * 8)


def test_decode_draws_untempered_rest_from_seeded_generator(make_cfg):
    """With the identity flow at init, the decoded factored dims are exactly the drawn rest."""
    codec = build(make_cfg("data.resolution=32"))                      # 256 tokens x 8 rest dims
    tokens = torch.zeros(2, 256, 4)
    x1 = codec.decode(tokens, generator=torch.Generator().manual_seed(3))
    x2 = codec.decode(tokens, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2)
    z = patchify(x1, 2)
    assert torch.equal(z[..., :4], tokens)
    rest = z[..., 4:]
    assert rest.std().item() == pytest.approx(1.0, abs=0.05)           # N(0, 1), not tempered
    assert abs(rest.mean().item()) < 0.06


def test_learnable_w_is_trained_by_the_loss(make_cfg):
    codec = build(make_cfg("model.factoring=learnable_w"))
    w = codec.linear.weight
    assert isinstance(w, torch.nn.Parameter) and any(p is w for p in codec.parameters())
    assert torch.allclose(w @ w.T, torch.eye(12), atol=1e-5)             # orthogonal init
    x = torch.rand(2, 8, 8, 3) * 2 - 1
    tokens, rest, logdet = codec.encode(x)
    (tokens.square().sum() + codec.prior_nll(rest).sum() - logdet.sum()).backward()
    assert w.grad is not None and w.grad.abs().max() > 1e-3


def test_pca_is_frozen_and_required(make_cfg):
    cfg = make_cfg("model.factoring=pca", "pca.enabled=true")
    pca = random_pca(12, seed=1)
    codec = codec_of(cfg, pca=pca)
    assert not any(p is codec.linear.weight for p in codec.parameters())   # frozen
    assert torch.equal(codec.state_dict()["linear.weight"], pca["components"])
    x = torch.rand(2, 8, 8, 3) * 2 - 1
    tokens, rest, _ = codec.encode(x)
    # PCA coordinates, centred on the mean of the dequantised data (+ E[u] = 0.5/127.5)
    y = (patchify(x, 2) - pca["mean"] - 0.5 / 127.5) @ pca["components"].T
    assert torch.allclose(rest, y[..., 4:], atol=1e-5)                  # identity flow at init
    with pytest.raises(ValueError, match="fit_pca"):
        codec_of(cfg, pca=None)
    with pytest.raises(ValueError, match="orthonormal"):
        codec_of(cfg, pca={"components": 2 * pca["components"], "mean": pca["mean"]})
    with pytest.raises(ValueError, match=r"\(12, 12\)"):
        codec_of(cfg, pca={"components": torch.eye(48), "mean": torch.zeros(48)})
    with pytest.raises(ValueError, match="missing"):
        codec_of(cfg, pca={"components": pca["components"]})


def test_encode_decode_reject_bad_shapes(tiny_cfg):
    codec = build(tiny_cfg)
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\]"):
        codec.encode(torch.zeros(1, 16, 16, 3))
    with pytest.raises(ValueError, match="model space"):
        codec.encode(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rest"):
        codec.decode(torch.zeros(1, 16, 4), torch.zeros(1, 16, 3))


def test_decode_stays_fp32_under_autocast(randomize):
    """Sampling code may call decode inside a bf16 autocast region (on CUDA); decode must
    ignore it, or bf16 coupling nets break the exact inverse. CPU autocast stands in here."""
    cfg = load_config(REPO_ROOT / "params.yaml")
    codec = build(cfg, randomize)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, rest, _ = codec.encode(to_model_space(images, dequantize=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_back = codec.decode(tokens, rest)
    assert x_back.dtype == torch.float32
    assert torch.equal(from_model_space(x_back), images)


@pytest.mark.parametrize("variant", ["learnable_w", "pca"])
def test_pre_flow_prior_nll_is_a_learnt_diagonal_gaussian(variant, make_cfg):
    """Dims factored out before the flow: NLL = -Normal(0, s).log_prob(rest) with a learnable
    per-channel s (its -sum log s included), and the loss trains s."""
    codec = build(make_cfg(f"model.factoring={variant}", "pca.enabled=true"))
    assert isinstance(codec.rest_log_scale, torch.nn.Parameter)
    assert any(p is codec.rest_log_scale for p in codec.parameters())
    with torch.no_grad():
        codec.rest_log_scale.copy_(torch.linspace(-3.0, 1.0, 8))
    rest = torch.randn(3, 16, 8) * 0.3
    s = torch.exp(torch.linspace(-3.0, 1.0, 8))
    expected = -torch.distributions.Normal(0.0, s).log_prob(rest).sum(dim=(1, 2))
    assert torch.allclose(codec.prior_nll(rest), expected, rtol=1e-5, atol=1e-4)
    unit = -torch.distributions.Normal(0.0, 1.0).log_prob(rest).sum(dim=(1, 2))
    assert (codec.prior_nll(rest) - unit).abs().min() > 1.0              # not N(0, I)
    codec.prior_nll(rest).sum().backward()
    assert codec.rest_log_scale.grad.abs().min() > 0
    with pytest.raises(ValueError, match="rest"):
        codec.prior_nll(torch.zeros(1, 16, 7))


def test_pca_prior_scale_is_the_ml_fit_under_dequantisation(make_cfg):
    cfg = make_cfg("model.factoring=pca", "pca.enabled=true")
    pca = random_pca(12, seed=2)
    codec = codec_of(cfg, pca=pca)
    var = pca["explained_variance"][4:].double() + 1.0 / (12 * 127.5 ** 2)
    assert torch.allclose(codec.rest_scale().double() ** 2, var, rtol=1e-5)
    with pytest.raises(ValueError, match="explained_variance"):
        codec_of(cfg, pca={k: v for k, v in pca.items() if k != "explained_variance"})


def test_decode_draws_rest_from_the_learnt_prior(make_cfg):
    """Sampling draws the factored-out dims from the same Gaussian the NLL scores."""
    codec = build(make_cfg("data.resolution=32", "model.factoring=learnable_w"))
    with torch.no_grad():
        codec.rest_log_scale.copy_(torch.log(torch.tensor([0.01, 0.1, 1.0, 3.0] * 2)))
    tokens = torch.zeros(1, 256, 4)
    x = codec.decode(tokens, generator=torch.Generator().manual_seed(0)).double()
    y = codec.linear(patchify(x, 2))[0]                                  # back to W coordinates
    rest = y[..., 4:].reshape(-1, 8)
    assert torch.allclose(rest.std(dim=0), codec.rest_scale().double(), rtol=0.15)


def _shapes_images(n, seed=0):
    """n default-world scenes rendered at 32x32, uint8 [n, 32, 32, 3]."""
    import numpy as np

    from jetformer.data.synthetic import render_scene, sample_scene
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([np.asarray(render_scene(sample_scene(rng), 32, 32, rng))
                                      for _ in range(n)]))


def test_pca_prior_draws_decode_to_training_image_statistics():
    """PCA fitted on shapes-world images, prior scales at their ML init, flow at its identity
    init: encode real images, replace the 32 factored-out dims of every token by prior draws,
    decode. The decoded images' per-pixel mean and std over the set match the real images'
    (tolerance: mean within 2 px and std within 10% of the real std, RMS over all pixels;
    measured 1.1 px and 3.4%);
    with N(0, I) draws (the old prior) the std is off by far more."""
    from jetformer.data.pca import fit_pca
    train, held = _shapes_images(600, seed=0), _shapes_images(600, seed=1)
    pca = fit_pca(train.numpy(), 4)
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=["model.factoring=pca",
                                                           "pca.enabled=true"])
    codec = codec_of(cfg, pca=pca).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tokens, rest, _ = codec.encode(to_model_space(held, g))
        sampled = from_model_space(codec.decode(tokens, generator=g)).double()
        unit = from_model_space(codec.decode(tokens, torch.randn(rest.shape, generator=g))).double()
    real = held.double()
    def rms(t):
        return t.square().mean().sqrt().item()
    mean_err = rms(sampled.mean(0) - real.mean(0))
    std_rel = rms(sampled.std(0) - real.std(0)) / rms(real.std(0))
    assert mean_err < 2.0, mean_err
    assert std_rel < 0.10, std_rel
    assert rms(unit.std(0) - real.std(0)) / rms(real.std(0)) > 0.5        # 0.58: the test can fail
    assert rms(unit.mean(0) - real.mean(0)) > 5.0                          # 16.8 px
