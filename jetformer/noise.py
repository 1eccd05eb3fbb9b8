"""Dequantisation and the RGB noise curriculum (paper §3.1-3.2).

Pixels live in [0, 255]. The curriculum adds Gaussian noise in *pixel units* and rounds,
without clipping (big_vision `trainers/proj/jetformer/train.py`, `loss_fn`). The model sees
`x = I/127.5 - 1 + u`, `u ~ U(0, 1/127.5)`: a continuous density on x is a lower bound on the
discrete likelihood of I (paper §3.1), and the 1/127.5 scaling costs log2(127.5) bits per
dimension.
"""
from __future__ import annotations

import math

import torch

PIXEL_SCALE = 127.5  # x = I / PIXEL_SCALE - 1


def sigma_at(progress: float, noise_cfg) -> float:
    """Curriculum noise std (pixel units) at training progress in [0, 1] (paper §3.2).

    `sigma = sigma_final + (sigma0 - sigma_final) * (1 + cos(pi * t')) / 2`,
    `t' = min(progress / curriculum_frac, 1)`; `curriculum_frac = 0` means no curriculum.
    """
    progress = float(progress)
    if not math.isfinite(progress) or progress < 0:
        raise ValueError(f"sigma_at: progress must be a finite number >= 0, got {progress!r}")
    frac = noise_cfg.curriculum_frac
    t = 1.0 if frac <= 0 else min(progress / frac, 1.0)
    s0, s1 = noise_cfg.sigma0, noise_cfg.sigma_final
    return s1 + (s0 - s1) * (1.0 + math.cos(math.pi * t)) / 2.0


def curriculum_noise(images_uint8: torch.Tensor, sigma, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """`round(I + sigma * N(0, 1))` in pixel units, NOT clipped (big_vision
    `trainers/proj/jetformer/train.py`, `loss_fn`).

    images_uint8: [B, H, W, C] integer pixels. sigma: a float or a [B] tensor of per-row stds
    (0 leaves a row unchanged, e.g. image-prefix rows). Returns float32 pixels [B, H, W, C].
    """
    pixels = images_uint8.to(torch.float32)
    B = pixels.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=pixels.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(B)
    if sigma.shape != (B,):
        raise ValueError(f"curriculum_noise: sigma must be a float or a [B={B}] tensor, "
                         f"got shape {tuple(sigma.shape)}")
    if not torch.isfinite(sigma).all() or (sigma < 0).any():
        raise ValueError(f"curriculum_noise: sigma must be finite and >= 0, got {sigma.tolist()}")
    noise = torch.randn(pixels.shape, generator=generator, device=pixels.device)
    sigma = sigma.view(B, *([1] * (pixels.ndim - 1)))  # [B, 1, 1, 1]
    return torch.round(pixels + sigma * noise)


def to_model_space(pixels: torch.Tensor, generator: torch.Generator | None = None,
                   dequantize: bool = True) -> torch.Tensor:
    """Pixels (uint8 or float, possibly outside [0, 255] after noise) -> x = I/127.5 - 1 + u,
    u ~ U(0, 1/127.5) when `dequantize` (paper §3.1). float32, same shape."""
    x = pixels.to(torch.float32) / PIXEL_SCALE - 1.0
    if dequantize:
        x = x + torch.rand(x.shape, generator=generator, device=x.device) / PIXEL_SCALE
    return x


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """Model space -> uint8 pixels: clip to [-1, 1] (as big_vision
    `models/proj/jetformer/patch_pca.py` `Model.decode`), rescale, round."""
    pixels = (x.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * PIXEL_SCALE
    return torch.round(pixels).clamp(0, 255).to(torch.uint8)


def bits_per_dim(nll_nats, num_dims: int):
    """Negative log-likelihood of x (nats) -> bits per pixel dimension of I in [0, 255].

    `nll / (num_dims * ln 2) + log2(127.5)`: the second term accounts for x = I/127.5 - 1
    (a density in x is 127.5^-1 times a density in pixel units, per dimension).
    """
    if num_dims <= 0:
        raise ValueError(f"bits_per_dim: num_dims must be > 0, got {num_dims}")
    return nll_nats / (num_dims * math.log(2.0)) + math.log2(PIXEL_SCALE)
