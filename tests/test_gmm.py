"""GMM head (GIVT): NLL vs torch.distributions, sampling moments, temperature, CFG density rule."""
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from jetformer.models.gmm import (GMMHead, gmm_cfg_sample, gmm_nll, gmm_sample, square_plus)

torch.set_num_threads(1)
KS_CRIT = 1.95  # Kolmogorov distribution: P(sqrt(n)·KS > 1.95) ≈ 0.001


def random_gmm(shape, K, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(*shape, K, generator=g)
    means = 2 * torch.randn(*shape, K, D, generator=g)
    scales = 0.2 + torch.rand(*shape, K, D, generator=g)
    return logits, means, scales


def torch_mixture(logits, means, scales):
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means, scales), 1))


def mixture_moments(logits, means, scales, temperature=1.0):
    """Per-dim mean and variance of Σ π_k N(μ_k, (t σ_k)²)."""
    pi = logits.softmax(-1)[..., None]                                  # [..., K, 1]
    mean = (pi * means).sum(-2)
    second = (pi * ((temperature * scales) ** 2 + means ** 2)).sum(-2)
    return mean, second - mean ** 2


def mixture_cdf(x, logits, means, scales):
    """Marginal CDF per dim: x [N, D], params of a single mixture ([K], [K, D]) -> [N, D]."""
    pi = logits.softmax(-1)[:, None]                                    # [K, 1]
    return (pi * Normal(means, scales).cdf(x[:, None, :])).sum(1)       # [N, D]


def ks_statistic(samples, cdf_values):
    """One-sample Kolmogorov–Smirnov statistic per dim; samples/cdf_values [N, D] (same order)."""
    n = samples.shape[0]
    order = samples.argsort(0)
    f = torch.gather(cdf_values, 0, order)
    i = torch.arange(1, n + 1, dtype=f.dtype)[:, None]
    return torch.maximum(i / n - f, f - (i - 1) / n).max(0).values


# ------------------------------------------------------------------------- NLL and the head
def test_nll_matches_torch_mixture_same_family():
    logits, means, scales = random_gmm((3, 4), K=5, D=6)
    x = 2 * torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    expected = -torch_mixture(logits, means, scales).log_prob(x)
    got = gmm_nll(logits, means, scales, x)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_nll_is_stable_far_from_every_component():
    logits, means, scales = random_gmm((2,), K=3, D=4)
    scales = scales * 1e-3
    x = means[:, 0] + 50.0                                              # ~1e4 stds away
    nll = gmm_nll(logits, means, scales, x)
    expected = -torch_mixture(logits.double(), means.double(), scales.double()).log_prob(x.double())
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(nll.double(), expected, rtol=1e-4, atol=0)


def test_head_layout_scale_map_and_zero_init():
    K, D, W = 3, 4, 8
    head = GMMHead(W, D, K)
    assert head.proj.out_features == K + K * 2 * D
    # zero init: every component is N(0, I) with equal weights
    logits, means, scales = head(torch.randn(2, 5, W))
    assert torch.all(logits == 0) and torch.all(means == 0) and torch.all(scales == 1)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(gmm_nll(logits, means, scales, x),
                               0.5 * (x ** 2).sum(-1) + 0.5 * D * math.log(2 * math.pi))
    # layout [K logits | K x 2 x D (loc, raw_scale)]
    bias = torch.randn(K + 2 * K * D)
    bias[-1] = -1e7                                                     # scale floor 1e-6
    with torch.no_grad():
        head.proj.bias.copy_(bias)
    logits, means, scales = head(torch.zeros(1, W))
    rest = bias[K:].view(K, 2, D)
    torch.testing.assert_close(logits[0], bias[:K])
    torch.testing.assert_close(means[0], rest[:, 0])
    r = rest[:, 1]
    torch.testing.assert_close(scales[0].flatten()[:-1],
                               ((r + torch.sqrt(r * r + 4)) / 2).flatten()[:-1])
    assert scales[0, -1, -1].item() == pytest.approx(1e-6)
    assert square_plus(torch.tensor(0.0)).item() == 1.0


def test_nll_runs_in_fp32_under_bf16_autocast():
    head = GMMHead(8, 4, 3)
    torch.nn.init.normal_(head.proj.weight, std=0.3)
    h, x = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, means, scales = head(h)
        nll = gmm_nll(logits, means, scales, x.bfloat16())
    assert logits.dtype == means.dtype == scales.dtype == nll.dtype == torch.float32
    torch.testing.assert_close(nll, gmm_nll(logits, means, scales, x.bfloat16().float()))


# ------------------------------------------------------------------------- sampling
def test_sample_moments_match_mixture():
    logits, means, scales = random_gmm((), K=3, D=2, seed=3)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = gmm_sample(logits.expand(n, 3), means.expand(n, 3, 2), scales.expand(n, 3, 2), generator=g)
    mean, var = mixture_moments(logits, means, scales)
    se_mean = (var / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all(), (x.mean(0), mean)
    torch.testing.assert_close(x.var(0), var, rtol=0.02, atol=0)
    ks = ks_statistic(x, mixture_cdf(x, logits, means, scales))
    assert (ks < KS_CRIT / math.sqrt(n)).all(), ks


def test_temperature_scales_the_component_stds():
    logits, means, scales = random_gmm((), K=3, D=2, seed=4)
    n = 200_000
    params = logits.expand(n, 3), means.expand(n, 3, 2), scales.expand(n, 3, 2)
    x_half = gmm_sample(*params, temperature=0.5, generator=torch.Generator().manual_seed(0))
    _, var_half = mixture_moments(logits, means, scales, temperature=0.5)
    torch.testing.assert_close(x_half.var(0), var_half, rtol=0.02, atol=0)
    # same seed: the same components and noise, so x - mu_k scales exactly by t
    one = logits[:1], means[:1], scales[:1]
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = gmm_sample(*(p.expand(1000, *p.shape) for p in one), temperature=1.0, generator=g1)
    b = gmm_sample(*(p.expand(1000, *p.shape) for p in one), temperature=0.3, generator=g2)
    torch.testing.assert_close(b - means[0], 0.3 * (a - means[0]), rtol=1e-5, atol=1e-6)


def test_sampling_is_seeded_and_keeps_leading_shape():
    logits, means, scales = random_gmm((2, 3), K=4, D=5)
    a = gmm_sample(logits, means, scales, generator=torch.Generator().manual_seed(1))
    b = gmm_sample(logits, means, scales, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 5) and torch.equal(a, b)
    c = gmm_cfg_sample((logits, means, scales), (logits, means + 1, scales), 2.0,
                       generator=torch.Generator().manual_seed(1))
    assert c.shape == (2, 3, 5) and torch.isfinite(c).all()


# ------------------------------------------------------------------------- classifier-free guidance
def test_cfg_with_zero_guidance_reproduces_the_conditional():
    cond = random_gmm((), K=3, D=2, seed=5)
    uncond = random_gmm((), K=3, D=2, seed=6)                           # deliberately different
    n = 100_000

    def expand(p):
        return tuple(t.expand(n, *t.shape) for t in p)
    x_cfg = gmm_cfg_sample(expand(cond), expand(uncond), 0.0, temperature=0.8,
                           generator=torch.Generator().manual_seed(0))
    x_ref = gmm_sample(*expand(cond), temperature=0.8, generator=torch.Generator().manual_seed(1))
    logits, means, scales = cond
    mean, var = mixture_moments(logits, means, scales, temperature=0.8)
    for x in (x_cfg, x_ref):
        assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
        torch.testing.assert_close(x.var(0), var, rtol=0.03, atol=0)
        ks = ks_statistic(x, mixture_cdf(x, logits, means, 0.8 * scales))
        assert (ks < KS_CRIT / math.sqrt(n)).all(), ks
    # two-sample KS between the guided (w = 0) and the plain sampler
    for a, b in zip(x_cfg.T, x_ref.T):
        at = torch.cat([a, b])                                          # evaluate both ECDFs here
        a, b = a.sort().values, b.sort().values
        gap = torch.searchsorted(a, at, right=True) - torch.searchsorted(b, at, right=True)
        assert gap.abs().max().item() / n < KS_CRIT * math.sqrt(2 / n)


def guided_density_on_grid(grid, logits_c, mu_c, sd_c, mu_u, sd_u, w):
    """Σ_k π_c,k · normalise_k[N(x; μc_k, σc_k)^(1+w) / N(x; μu_k, σu_k)^w] on a 1-D grid."""
    log_t = ((1 + w) * Normal(mu_c, sd_c).log_prob(grid[:, None])
             - w * Normal(mu_u, sd_u).log_prob(grid[:, None]))          # [G, K]
    dens = (log_t - log_t.max(0).values).exp()
    dens = dens / torch.trapezoid(dens, grid, dim=0)
    return (dens * logits_c.softmax(-1)).sum(-1)                        # [G]


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_cfg_matches_the_guided_density_rule(w):
    # 1-D, two components; uncond shifted left of cond, so guidance pushes samples right
    logits_c, logits_u = torch.tensor([0.3, -0.2]), torch.tensor([-1.0, 1.0])
    mu_c, sd_c = torch.tensor([-1.0, 1.5]), torch.tensor([0.6, 0.4])
    mu_u, sd_u = torch.tensor([-2.5, 0.5]), torch.tensor([1.0, 0.9])
    n = 100_000
    cond = (logits_c.expand(n, 2), mu_c[:, None].expand(n, 2, 1), sd_c[:, None].expand(n, 2, 1))
    uncond = (logits_u.expand(n, 2), mu_u[:, None].expand(n, 2, 1), sd_u[:, None].expand(n, 2, 1))
    x, accepted = gmm_cfg_sample(cond, uncond, w, generator=torch.Generator().manual_seed(0),
                                 return_accept_rate=True)
    x = x[:, 0].double()
    assert accepted == 1.0

    grid = torch.linspace(-6, 6, 24001, dtype=torch.float64)
    dens = guided_density_on_grid(grid, logits_c.double(), mu_c.double(), sd_c.double(),
                                  mu_u.double(), sd_u.double(), w)
    target_mean = torch.trapezoid(dens * grid, grid)
    target_var = torch.trapezoid(dens * (grid - target_mean) ** 2, grid)
    cdf = torch.cumulative_trapezoid(dens, grid)
    cdf = torch.cat([cdf.new_zeros(1), cdf])
    cond_mean = (logits_c.softmax(-1) * mu_c).sum().double()

    assert target_mean > cond_mean + 0.1                                 # the rule moves mass right
    assert abs(x.mean() - target_mean) < 5 * (target_var / n).sqrt()
    assert x.var().item() == pytest.approx(target_var.item(), rel=0.03)
    sample_cdf = torch.from_numpy(__import__("numpy").interp(x.numpy(), grid.numpy(), cdf.numpy()))
    ks = ks_statistic(x[:, None], sample_cdf[:, None])
    assert ks.item() < KS_CRIT / math.sqrt(n), ks


def test_cfg_identical_streams_give_the_conditional_for_any_guidance():
    # p^(1+w) / p^w = p: guidance has nothing to push against
    cond = random_gmm((), K=2, D=3, seed=8)
    n = 100_000
    params = tuple(t.expand(n, *t.shape) for t in cond)
    x = gmm_cfg_sample(params, params, 4.0, generator=torch.Generator().manual_seed(2))
    mean, var = mixture_moments(*cond)
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    torch.testing.assert_close(x.var(0), var, rtol=0.03, atol=0)


def test_cfg_falls_back_to_the_conditional_component_when_nothing_is_accepted():
    cond = random_gmm((4000,), K=2, D=3, seed=9)
    uncond = random_gmm((4000,), K=2, D=3, seed=10)
    x, accepted = gmm_cfg_sample(cond, uncond, 2.0, max_tries=1,
                                 generator=torch.Generator().manual_seed(3),
                                 return_accept_rate=True)
    assert 0.0 < accepted < 1.0 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="guidance"):
        gmm_cfg_sample(cond, uncond, -1.0)


def test_cfg_improper_guided_density_falls_back_to_the_conditional():
    # (1+w)/σc² − w/σu² < 0: the target grows in the tails; draw from N(μc, σc) instead
    n = 50_000
    cond = (torch.zeros(n, 1), torch.full((n, 1, 2), 0.5), torch.ones(n, 1, 2))
    uncond = (torch.zeros(n, 1), torch.full((n, 1, 2), -0.5), torch.full((n, 1, 2), 0.3))
    x, guided = gmm_cfg_sample(cond, uncond, 2.0, generator=torch.Generator().manual_seed(4),
                               return_accept_rate=True)
    assert guided == 0.0
    torch.testing.assert_close(x.mean(0), torch.full((2,), 0.5), rtol=0, atol=0.03)
    torch.testing.assert_close(x.std(0), torch.ones(2), rtol=0.02, atol=0)


def test_cfg_standardised_log_ratio_and_envelope():
    """In proposal units ε = (x − μc)/s the rejection log-ratio is α·ε² + β·ε (+ const), and
    log_m is its maximum over the window |ε| <= radius (checked on a fine grid)."""
    from jetformer.models.gmm import _standardised_log_ratio, cfg_log_density, normal_log_prob
    g = torch.Generator().manual_seed(11)
    n = 64                                    # float64 throughout: the check is on the algebra
    mu_c, mu_u = (torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(2))
    sigma_c, sigma_u = (0.2 + torch.rand(n, 1, generator=g, dtype=torch.float64) for _ in range(2))
    s = 2 * torch.maximum(sigma_c, sigma_u)
    eps = torch.linspace(-6, 6, 20001, dtype=torch.float64)[None]               # [1, G]
    x = mu_c + s * eps
    for w in (0.0, 0.7, 3.0):
        alpha, beta, log_m = _standardised_log_ratio(mu_c, sigma_c, mu_u, sigma_u, s, w, 6.0)
        direct = (cfg_log_density(x, mu_c, sigma_c, mu_u, sigma_u, w)
                  - normal_log_prob(x, mu_c, s))
        quad = alpha * eps ** 2 + beta * eps
        diff = direct - quad                                                    # a constant per row
        assert (diff - diff[:, :1]).abs().max() < 1e-9
        grid_max = quad.max(1, keepdim=True).values
        assert (log_m >= grid_max - 1e-12).all() and (log_m - grid_max).abs().max() < 1e-4


@pytest.mark.parametrize("batch", [100_000, 16])
def test_cfg_tries_per_dim_are_capped_exactly(batch):
    """Acceptance probability 0.1 per try (same means, σu = 1, σc chosen so that 1 − 2α = 100):
    with max_tries = 20 a dim is guided with probability 1 − 0.9^20, whatever the chunking
    (a big batch runs a first chunk of 16 tries then 4; 16 dims run all 20 in one chunk)."""
    w, max_tries = 1.0, 20
    sigma_c = 2 / math.sqrt(52.0)             # α = (1 − 2·(2/σc)² + 4) / 2 = −49.5
    n_calls = 1 if batch > 16 else 500
    shape = (batch, 1)
    cond = (torch.zeros(*shape, 1), torch.zeros(*shape, 1, 1), torch.full((*shape, 1, 1), sigma_c))
    uncond = (torch.zeros(*shape, 1), torch.zeros(*shape, 1, 1), torch.ones(*shape, 1, 1))
    g = torch.Generator().manual_seed(12)
    xs, rates = [], []
    for _ in range(n_calls):
        x, rate = gmm_cfg_sample(cond, uncond, w, max_tries=max_tries, generator=g,
                                 return_accept_rate=True)
        xs.append(x.flatten())
        rates.append(rate)
    n = batch * n_calls
    expected = 1 - 0.9 ** max_tries                                           # 0.878
    assert abs(sum(rates) / n_calls - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    # guided draws ~ N(0, 1/precision), fallbacks ~ N(0, σc²): the variance of the mixture
    var_guided = 1 / ((1 + w) / sigma_c ** 2 - w)
    var = expected * var_guided + (1 - expected) * sigma_c ** 2
    x = torch.cat(xs)
    assert x.var().item() == pytest.approx(var, rel=6 * math.sqrt(2 / n) + 0.01)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_sample_draws_what_gmm_sample_draws(temperature):
    """`GMMHead.sample` (the decoding fast path) = `gmm_sample` of the head's mixture: the same
    components and values from the same generator state."""
    torch.manual_seed(0)
    head = GMMHead(width=12, dim=5, num_mixtures=6)
    torch.nn.init.normal_(head.proj.weight, std=0.5)
    torch.nn.init.normal_(head.proj.bias, std=0.5)
    h = torch.randn(64, 12)
    fast = head.sample(h, temperature, torch.Generator().manual_seed(3))
    ref = gmm_sample(*head(h), temperature, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    other = head.sample(h, temperature, torch.Generator().manual_seed(4))
    assert (other - ref).abs().max() > 0.1                              # the draw is random
    with pytest.raises(ValueError, match="temperature"):
        head.sample(h, 0.0)
