"""Noise curriculum, dequantisation and bits/dim accounting (paper §3.1-3.2)."""
import math

import pytest
import torch

from jetformer.config import NoiseConfig
from jetformer.noise import (bits_per_dim, curriculum_noise, from_model_space, sigma_at,
                             to_model_space)


def test_sigma_schedule_endpoints_midpoint_and_monotone():
    cfg = NoiseConfig(sigma0=64.0, sigma_final=3.0, curriculum_frac=1.0)
    assert sigma_at(0.0, cfg) == pytest.approx(64.0)
    assert sigma_at(1.0, cfg) == pytest.approx(3.0)
    assert sigma_at(0.5, cfg) == pytest.approx((64.0 + 3.0) / 2)      # cos(pi/2) = 0
    assert sigma_at(0.25, cfg) == pytest.approx(3.0 + 61.0 * (1 + math.cos(math.pi / 4)) / 2)
    values = [sigma_at(i / 100, cfg) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[1] < values[0] and values[-1] < values[-2]          # strictly moving


def test_sigma_schedule_curriculum_fraction_and_edge_cases():
    cfg = NoiseConfig(sigma0=16.0, sigma_final=0.0, curriculum_frac=0.5)
    assert sigma_at(0.25, cfg) == pytest.approx(8.0)                  # halfway through 0.5
    assert sigma_at(0.5, cfg) == pytest.approx(0.0)
    assert sigma_at(0.9, cfg) == pytest.approx(0.0)                   # stays final afterwards
    assert sigma_at(0.3, NoiseConfig(16.0, 2.0, 0.0)) == pytest.approx(2.0)  # no curriculum
    with pytest.raises(ValueError, match="progress"):
        sigma_at(-0.1, cfg)


def test_curriculum_noise_zero_sigma_rows_unchanged_and_integer_valued():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=g)
    out = curriculum_noise(images, torch.tensor([0.0, 10.0, 0.0, 3.0]), generator=g)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out[0], images[0].float()) and torch.equal(out[2], images[2].float())
    assert not torch.equal(out[1], images[1].float())
    assert torch.equal(out, out.round())                              # rounded to pixel levels
    assert torch.equal(curriculum_noise(images, 0.0), images.float())  # scalar sigma 0


def test_curriculum_noise_std_matches_sigma_and_is_not_clipped():
    g = torch.Generator().manual_seed(1)
    images = torch.full((2, 64, 64, 3), 128, dtype=torch.uint8)
    sigma = torch.tensor([16.0, 4.0])
    delta = curriculum_noise(images, sigma, generator=g) - 128.0
    for row, s in enumerate(sigma.tolist()):
        d = delta[row].flatten()                                      # 12288 samples
        expected_std = math.sqrt(s ** 2 + 1 / 12)                     # + rounding noise
        assert d.std().item() == pytest.approx(expected_std, rel=0.03)
        assert abs(d.mean().item()) < 4 * expected_std / math.sqrt(d.numel())
    dark = curriculum_noise(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), 16.0, generator=g)
    assert dark.min() < 0                                             # not clipped to [0, 255]


def test_curriculum_noise_rejects_bad_sigma():
    images = torch.zeros(3, 4, 4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\[B=3\]"):
        curriculum_noise(images, torch.ones(2))
    with pytest.raises(ValueError, match=">= 0"):
        curriculum_noise(images, -1.0)


def test_model_space_dequantisation_range_and_exact_round_trip():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(4, 16, 16, 3)
    x0 = to_model_space(levels, dequantize=False)
    assert x0.min() == -1.0 and x0.max() == 1.0
    assert torch.equal(from_model_space(x0), levels)
    g = torch.Generator().manual_seed(0)
    x = to_model_space(levels, generator=g)
    u = (x - x0) * 127.5                                              # dequantisation in pixels
    assert u.min() >= 0 and u.max() < 1 + 1e-5
    assert u.mean().item() == pytest.approx(0.5, abs=0.02)            # U(0, 1) in pixel units
    assert torch.equal(from_model_space(torch.tensor([-3.0, 2.0])), torch.tensor([0, 255],
                                                                                dtype=torch.uint8))


def test_bits_per_dim_accounts_for_scaling():
    assert bits_per_dim(0.0, 10) == pytest.approx(math.log2(127.5))
    # a uniform density over the 256 dequantised pixel levels, i.e. over an interval of
    # length 256/127.5 in model space, is exactly 8 bits per dimension.
    num_dims = 3 * 32 * 32
    nll = num_dims * math.log(256 / 127.5)
    assert bits_per_dim(nll, num_dims) == pytest.approx(8.0)
    per_image = bits_per_dim(torch.tensor([nll, 2 * nll]), num_dims)
    assert per_image[1] - per_image[0] == pytest.approx(math.log2(256 / 127.5))
