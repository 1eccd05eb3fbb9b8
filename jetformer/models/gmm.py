"""Diagonal Gaussian-mixture head over soft tokens (GIVT, arXiv 2312.02116; JetFormer §3).

The decoder's output at each image position parameterises a mixture of K diagonal Gaussians over
the d factored dims of the next soft token:

    p(x) = Σ_k π_k Π_i N(x_i; μ_ki, σ_ki)

Sampling draws a component k ~ π, then x ~ N(μ_k, (t·σ_k)²) (temperature t scales the stds).
Classifier-free guidance follows GIVT: k is drawn from the *conditional* weights, and each dim is
drawn from the guided density ∝ N(x; μc_k, σc_k)^(1+w) / N(x; μu_k, σu_k)^w by rejection sampling
(the unconditional mixture contributes its SAME component k). GMM parameters are never mixed.
All maths runs in fp32 (also under bf16 autocast). A `generator` must live on the parameters'
device.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
MIN_SCALE = 1e-6


def square_plus(r: torch.Tensor) -> torch.Tensor:
    """Smooth positive map used for the stds: (r + sqrt(r² + 4)) / 2 (= 1 at r = 0)."""
    return (r + torch.sqrt(r * r + 4.0)) / 2


class GMMHead(nn.Module):
    """Zero-initialised Dense(width → K + K·2·D); at init the mixture is N(0, I) for every k.

    Output layout (official code): `[K mixture logits | K × 2 × D (loc, raw_scale)]`.
    """

    def __init__(self, width: int, dim: int, num_mixtures: int):
        super().__init__()
        if min(width, dim, num_mixtures) <= 0:
            raise ValueError(f"GMMHead needs positive sizes, got width={width}, dim={dim}, "
                             f"num_mixtures={num_mixtures}")
        self.dim, self.num_mixtures = dim, num_mixtures
        self.proj = nn.Linear(width, num_mixtures + num_mixtures * 2 * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor):
        """h [..., W] -> (logits [..., K], means [..., K, D], scales [..., K, D]), all fp32."""
        K, D = self.num_mixtures, self.dim
        out = self.proj(h).float()                                 # [..., K + 2KD]
        logits, loc_scale = out.split([K, 2 * K * D], dim=-1)      # [..., K], [..., 2KD]
        means, raw_scales = loc_scale.unflatten(-1, (K, 2, D)).unbind(-2)   # [..., K, D] x2
        return logits, means, square_plus(raw_scales).clamp_min(MIN_SCALE)

    def sample(self, h: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """`gmm_sample(*self(h), temperature, generator)` for h [B, W] -> [B, D], the same draws
        (same random numbers; values equal up to rounding) with fewer, smaller ops (decoding is
        bound by per-op overhead): one gather picks the component's (loc, raw scale) pair and
        only its D stds go through square_plus."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        K, D = self.num_mixtures, self.dim
        out = self.proj(h).float()                                          # [B, K + 2KD]
        k = sample_component(out[:, :K], generator)                         # [B]
        pairs = out[:, K:].view(-1, K, 2 * D)
        loc, raw = pairs.gather(1, k.view(-1, 1, 1).expand(-1, 1, 2 * D)).view(-1, 2, D).unbind(1)
        sigma = square_plus(raw).clamp_min_(MIN_SCALE).mul_(temperature)
        return torch.addcmul(loc, sigma, _randn(loc.shape, loc, generator))


def _check_shapes(logits, means, scales):
    if means.shape != scales.shape or logits.shape != means.shape[:-1]:
        raise ValueError(f"GMM parameter shapes disagree: logits {tuple(logits.shape)}, means "
                         f"{tuple(means.shape)}, scales {tuple(scales.shape)} (want [..., K], "
                         "[..., K, D], [..., K, D])")


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, scale²)."""
    return -0.5 * ((x - mean) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI


def gmm_nll(logits: torch.Tensor, means: torch.Tensor, scales: torch.Tensor,
            x: torch.Tensor) -> torch.Tensor:
    """-log p(x) in nats (summed over D): logits [..., K], means/scales [..., K, D],
    x [..., D] -> [...]."""
    _check_shapes(logits, means, scales)
    with torch.autocast(x.device.type, enabled=False):
        logits, means, scales, x = logits.float(), means.float(), scales.float(), x.float()
        comp = normal_log_prob(x.unsqueeze(-2), means, scales).sum(-1)      # [..., K]
        return -torch.logsumexp(F.log_softmax(logits, dim=-1) + comp, dim=-1)


def _randn(shape, like: torch.Tensor, generator):
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _rand(shape, like: torch.Tensor, generator):
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def sample_component(logits: torch.Tensor, generator=None) -> torch.Tensor:
    """k ~ Categorical(softmax(logits)) by the Gumbel-max trick: [..., K] -> long [...]."""
    u = _rand(logits.shape, logits, generator).clamp_(1e-20, 1.0)
    return torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)


def select_component(params: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """params [..., K, D], k [...] -> params[..., k, :] of shape [..., D]."""
    index = k[..., None, None].expand(*k.shape, 1, params.shape[-1])
    return torch.gather(params, -2, index).squeeze(-2)


def gmm_sample(logits: torch.Tensor, means: torch.Tensor, scales: torch.Tensor,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ Σ_k π_k N(μ_k, (t·σ_k)²): logits [..., K], means/scales [..., K, D] -> [..., D]."""
    _check_shapes(logits, means, scales)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits, means, scales = logits.float(), means.float(), scales.float()
    k = sample_component(logits, generator)                               # [...]
    mu, sigma = select_component(means, k), select_component(scales, k)   # [..., D]
    return mu + temperature * sigma * _randn(mu.shape, mu, generator)


def cfg_log_density(x, mu_c, sigma_c, mu_u, sigma_u, guidance: float) -> torch.Tensor:
    """Unnormalised guided log-density per dim: (1+w)·log N(x; μc, σc) − w·log N(x; μu, σu)."""
    return ((1 + guidance) * normal_log_prob(x, mu_c, sigma_c)
            - guidance * normal_log_prob(x, mu_u, sigma_u))


def _standardised_log_ratio(mu_c, sigma_c, mu_u, sigma_u, prop_scale, guidance, radius):
    """The rejection log-ratio in proposal units ε = (x − μc) / s, for q = N(μc, s):

        log[p̃(x) / q(x)] = α·ε² + β·ε + const,  α = (1 − (1+w)·(s/σc)² + w·(s/σu)²) / 2,
                                                 β = w·(s/σu)·(μc − μu)/σu.
    Returns (α, β, log_m) with log_m = max of α·ε² + β·ε over |ε| ≤ radius (the envelope
    M = max p̃/q over |x − μc| ≤ radius·s, up to the same constant): the clamped vertex when
    α < 0 (concave), else the end on β's side. So log(p̃ / (M·q)) = α·ε² + β·ε − log_m.
    The guided target is a proper density iff its precision (1+w)/σc² − w/σu² = (1 − 2α)/s² > 0."""
    w = guidance
    r_c, r_u = prop_scale / sigma_c, prop_scale / sigma_u
    alpha = torch.addcmul((r_c * r_c).mul_(-0.5 * (1 + w)).add_(0.5), r_u, r_u, value=0.5 * w)
    beta = (mu_c - mu_u).mul_(r_u).div_(sigma_u).mul_(w)
    # the larger end of the window, and the (clamped) vertex: the max where α < 0, never above
    # the ends where α > 0 (fmax: a NaN vertex at α = β = 0 loses)
    ends = torch.add(alpha, beta.abs(), alpha=1 / radius).mul_(radius ** 2)
    vertex = (beta / alpha).mul_(-0.5).clamp_(-radius, radius)
    return alpha, beta, torch.fmax(ends, torch.addcmul(beta, alpha, vertex).mul_(vertex))


# First chunk of tries: about this many proposals in all (at least 16 per scalar), so a small
# batch (one image: 16 dims) almost always finishes in one vectorised round.
FIRST_CHUNK_PROPOSALS = 1024


def gmm_cfg_sample(cond, uncond, guidance: float, temperature: float = 1.0,
                   generator: torch.Generator | None = None, max_tries: int = 1000,
                   radius: float = 6.0, return_accept_rate: bool = False):
    """Classifier-free guidance for mixtures (GIVT §3.3, JetFormer §3 'Sampling').

    cond, uncond: `(logits [..., K], means [..., K, D], scales [..., K, D])` of the conditional and
    unconditional predictions. Temperature scales both mixtures' stds first. Then per position a
    component k is drawn from the conditional weights, and per dim the target
        p̃(x) ∝ N(x; μc_k, σc_k)^(1+w) / N(x; μu_k, σu_k)^w
    is sampled by rejection from the proposal q = N(μc_k, s), s = 2·max(σc_k, σu_k), with the
    envelope M = max p̃/q taken over |x − μc| ≤ radius·s (exact there: the log-ratio is quadratic).
    Up to `max_tries` proposals per dim: a first vectorised chunk of
    max(16, FIRST_CHUNK_PROPOSALS / #dims) tries for every dim, then doubling chunks for the
    dims still pending; each dim keeps its first accepted try (the same distribution as one try
    at a time). Dims where none was accepted fall back to N(μc_k, σc_k). So do dims whose guided
    density cannot be normalised (precision (1+w)/σc² − w/σu² ≤ 0: it grows in the tails, and any
    "accepted" draw would sit at the edge of the window). Returns x [..., D] (and the fraction of
    dims drawn from the guided density, if asked). guidance = 0 reproduces the conditional
    mixture (in distribution).
    """
    logits_c, means_c, scales_c = (t.float() for t in cond)
    logits_u, means_u, scales_u = (t.float() for t in uncond)
    _check_shapes(logits_c, means_c, scales_c)
    _check_shapes(logits_u, means_u, scales_u)
    if means_c.shape != means_u.shape:
        raise ValueError(f"cond/uncond GMM shapes differ: {tuple(means_c.shape)} vs "
                         f"{tuple(means_u.shape)}")
    if not guidance >= 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")

    k = sample_component(logits_c, generator)                                # [...]
    # both streams' parameters of the SAME component k, in one gather: [4, ..., D]
    params = select_component(torch.stack([means_c, means_u, scales_c, scales_u]),
                              k.expand(4, *k.shape)).view(4, -1, 1)          # [4, M, 1]
    params.narrow(0, 2, 2).mul_(temperature)
    mu_c, mu_u, sigma_c, sigma_u = params.unbind(0)                          # [M, 1] each
    prop_scale = torch.maximum(sigma_c, sigma_u).mul_(2)
    alpha, beta, log_m = _standardised_log_ratio(mu_c, sigma_c, mu_u, sigma_u, prop_scale,
                                                 guidance, radius)
    improper = alpha >= 0.5
    log_m.masked_fill_(improper, float("inf"))                               # never accept

    # Rejection sampling on the M scalars: chunks of tries [P, n] for the P still pending; try j
    # of a scalar is accepted when log u_j < α·ε_j² + β·ε_j − log_m.
    M = mu_c.shape[0]
    eps, guided, pending = None, None, None                                  # None = all M
    tries, n = 0, min(max_tries, max(16, FIRST_CHUNK_PROPOSALS // max(M, 1)))
    while n > 0:
        a, b, lm = ((alpha, beta, log_m) if pending is None
                    else (alpha[pending], beta[pending], log_m[pending]))    # [P, 1]
        e = _randn((a.shape[0], n), a, generator)                            # [P, n] proposals
        accept = torch.log(_rand(e.shape, e, generator)).add_(lm) < torch.addcmul(b, a, e).mul_(e)
        first = accept.to(torch.uint8).argmax(1, keepdim=True)               # first accepted try
        found = torch.gather(accept, 1, first)                               # [P, 1] any accepted
        pick = torch.gather(e, 1, first)                                     # [P, 1]
        tries += n
        n = min(2 * n, max_tries - tries)
        if pending is None:  # the first round covers every scalar
            eps, guided = pick, found
            if bool(found.all()):
                break
            pending = torch.nonzero(~(found | improper)[:, 0]).squeeze(1)
        else:
            found = found[:, 0]
            idx = pending[found]
            eps[idx], guided[idx] = pick[found], True
            pending = pending[~found]
        if pending.numel() == 0:
            break
    sample = torch.addcmul(mu_c, prop_scale, eps)                            # x = μc + s·ε
    if pending is not None:  # fallback N(μc, σc) for improper or never-accepted dims
        fallback = torch.addcmul(mu_c, sigma_c, _randn(mu_c.shape, mu_c, generator))
        sample = torch.where(guided, sample, fallback)
    sample = sample.view(means_c.shape[:-2] + means_c.shape[-1:])            # [..., D]
    if return_accept_rate:
        return sample, int(guided.sum()) / max(M, 1)
    return sample
