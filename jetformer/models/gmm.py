"""Diagonal Gaussian-mixture head over soft tokens (GIVT, arXiv 2312.02116; JetFormer §3).

The decoder's output at each image position parameterises a mixture of K diagonal Gaussians over
the d factored dims of the next soft token:

    p(x) = Σ_k π_k Π_i N(x_i; μ_ki, σ_ki)

Sampling draws a component k ~ π, then x ~ N(μ_k, (t·σ_k)²) (temperature t scales the stds).
Classifier-free guidance follows GIVT: k is drawn from the *conditional* weights, and each dim is
drawn from the guided density ∝ N(x; μc_k, σc_k)^(1+w) / N(x; μu_k, σu_k)^w by rejection sampling
(the unconditional mixture contributes its SAME component k). GMM parameters are never mixed.
All maths runs in fp32 (also under bf16 autocast). A `generator` must live on the parameters' device.
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
        logits = out[..., :K]                                      # [..., K]
        loc_scale = out[..., K:].unflatten(-1, (K, 2, D))          # [..., K, 2, D]
        means = loc_scale[..., 0, :]                               # [..., K, D]
        scales = square_plus(loc_scale[..., 1, :]).clamp_min(MIN_SCALE)
        return logits, means, scales


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
    """-log p(x) in nats (summed over D): logits [..., K], means/scales [..., K, D], x [..., D] -> [...]."""
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


def _log_envelope(mu_c, sigma_c, mu_u, sigma_u, prop_scale, guidance, radius):
    """max over |x − μc| ≤ radius·s of log[p̃(x) / q(x)], q = N(μc, s). The log-ratio is a quadratic
    a·x² + b·x + c in x, so its maximum on the interval is at an end or at the vertex."""
    w = guidance
    a = -(1 + w) / (2 * sigma_c ** 2) + w / (2 * sigma_u ** 2) + 1 / (2 * prop_scale ** 2)
    b = (1 + w) * mu_c / sigma_c ** 2 - w * mu_u / sigma_u ** 2 - mu_c / prop_scale ** 2
    lo, hi = mu_c - radius * prop_scale, mu_c + radius * prop_scale
    vertex = torch.where(a < 0, -b / (2 * a).clamp_max(-1e-30), mu_c)
    vertex = torch.minimum(torch.maximum(vertex, lo), hi)

    def log_ratio(x):
        return (cfg_log_density(x, mu_c, sigma_c, mu_u, sigma_u, w)
                - normal_log_prob(x, mu_c, prop_scale))
    return torch.maximum(torch.maximum(log_ratio(lo), log_ratio(hi)), log_ratio(vertex))


def gmm_cfg_sample(cond, uncond, guidance: float, temperature: float = 1.0,
                   generator: torch.Generator | None = None, max_tries: int = 1000,
                   radius: float = 6.0, return_accept_rate: bool = False):
    """Classifier-free guidance for mixtures (GIVT §3.3, JetFormer §3 'Sampling').

    cond, uncond: `(logits [..., K], means [..., K, D], scales [..., K, D])` of the conditional and
    unconditional predictions. Temperature scales both mixtures' stds first. Then per position a
    component k is drawn from the conditional weights, and per dim the target
        p̃(x) ∝ N(x; μc_k, σc_k)^(1+w) / N(x; μu_k, σu_k)^w
    is sampled by rejection from the proposal q = N(μc_k, 2·max(σc_k, σu_k)) with the envelope
    M = max p̃/q taken over |x − μc| ≤ radius·s (exact there: the log-ratio is quadratic). Up to
    `max_tries` proposals per dim (in growing chunks, only for dims not yet accepted); dims where
    none was accepted fall back to N(μc_k, σc_k). So do dims whose guided density cannot be
    normalised (precision (1+w)/σc² − w/σu² ≤ 0: it grows in the tails, and any "accepted" draw
    would sit at the edge of the window). Returns x [..., D] (and the fraction of dims drawn from
    the guided density, if asked). guidance = 0 reproduces the conditional mixture (in distribution).
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
    mu_c = select_component(means_c, k)                                      # [..., D]
    sigma_c = temperature * select_component(scales_c, k)
    mu_u = select_component(means_u, k)                                      # same component k
    sigma_u = temperature * select_component(scales_u, k)
    prop_scale = 2 * torch.maximum(sigma_c, sigma_u)                         # [..., D]
    log_m = _log_envelope(mu_c, sigma_c, mu_u, sigma_u, prop_scale, guidance, radius)

    fallback = mu_c + sigma_c * _randn(mu_c.shape, mu_c, generator)          # N(μc, σc)
    # Rejection sampling on the flat list of still-pending scalars, with growing chunks of tries.
    params = [t.reshape(-1) for t in (mu_c, sigma_c, mu_u, sigma_u, prop_scale, log_m)]
    sample = fallback.reshape(-1).clone()                                    # [M]
    precision = (1 + guidance) / sigma_c ** 2 - guidance / sigma_u ** 2      # of the guided target
    pending = torch.nonzero(precision.reshape(-1) > 0).squeeze(-1)           # [P] proper targets
    tries, n, num_guided = 0, min(16, max_tries), 0
    while tries < max_tries and pending.numel() > 0:
        mc, sc, mu, su, ps, lm = (t[pending] for t in params)                # [P]
        xs = mc + ps * _randn((n, pending.numel()), mc, generator)           # [n, P]
        log_accept = (cfg_log_density(xs, mc, sc, mu, su, guidance)
                      - normal_log_prob(xs, mc, ps) - lm)
        accept = torch.log(_rand(xs.shape, xs, generator)) < log_accept      # [n, P]
        found = accept.any(0)                                                # [P]
        first = torch.argmax(accept.to(torch.uint8), dim=0)                  # first accepted try
        pick = torch.gather(xs, 0, first[None]).squeeze(0)                   # [P]
        sample[pending[found]] = pick[found]
        pending = pending[~found]
        num_guided += int(found.sum())
        tries += n
        n = min(2 * n, max_tries - tries)
    sample = sample.view(mu_c.shape)                                         # [..., D]
    if return_accept_rate:
        return sample, num_guided / max(sample.numel(), 1)
    return sample
