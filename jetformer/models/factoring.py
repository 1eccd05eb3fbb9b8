"""ImageCodec: pixels in model space <-> soft tokens, for every factoring variant (paper §3.2,
App. B, Table 2).

Every dimension of the image is scored exactly once: the first `factored_dims` dims of each
latent token go to the transformer (`tokens`), the rest (`rest`) are scored here by `prior_nll`,
and `logdet` carries the change of variables of everything invertible.

The prior of `rest`: after the flow (`post_flow`) N(0, I), the flow itself scales those dims.
Factored out *before* the flow (`learnable_w`, `pca`) nothing rescales them, so they get a
per-channel Gaussian N(0, diag(s^2)) with its own learnable scale s (paper §3.2 "model the
remaining channels with a Gaussian distribution", as in probabilistic PCA, Tipping & Bishop
1999). For `pca` s starts at its maximum-likelihood value under dequantisation, see
`pca_prior_init`. Samples draw `rest` from that same prior.

  post_flow    patchify -> Jet(3p^2)            -> tokens = z[..., :d], rest = z[..., d:]
  learnable_w  patchify -> y = x W^T (learned)  -> Jet(d)(y[..., :d]) = tokens, rest = y[..., d:]
  pca          patchify -> y = (x - mean) W^T with W, mean from PCA (frozen), then as learnable_w
  none         patchify -> Jet(3p^2)            -> tokens = z (d = 3p^2), nothing factored out
  no_flow      patchify                         -> tokens = patches, logdet = 0
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from jetformer.noise import PIXEL_SCALE

from .jet import Jet, patchify, unpatchify

FACTORINGS = ("post_flow", "learnable_w", "pca", "none", "no_flow")
PRE_FLOW = ("learnable_w", "pca")       # rest factored out before the flow: own Gaussian prior
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# dequantisation u ~ U(0, 1/127.5) per dim (jetformer.noise.to_model_space): mean and variance
DEQUANT_MEAN = 0.5 / PIXEL_SCALE
DEQUANT_VAR = 1.0 / (12.0 * PIXEL_SCALE ** 2)


def standard_normal_nll(z: torch.Tensor) -> torch.Tensor:
    """NLL in nats under N(0, I), summed per row: [B, ...] -> [B] (fp32 under half precision)."""
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return (0.5 * z ** 2 + _HALF_LOG_2PI).flatten(1).sum(dim=1)


def pca_prior_init(pca: dict, factored_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-likelihood init of the `pca` variant from the fitted PCA of *undequantised*
    patches: returns (mean [D], log_scale [D - d]).

    The model sees x + u with u ~ U(0, 1/127.5) i.i.d. per dim and independent of x, so the
    data mean shifts by E[u] = 0.5/127.5 and the covariance gains Var[u] I = I/(12 * 127.5^2),
    isotropic and hence the same in every orthonormal PCA basis: the ML variance of residual
    channel j is explained_variance[d + j] + Var[u]."""
    if "explained_variance" not in pca:
        raise ValueError("PCA dict is missing key 'explained_variance' (needed to initialise the "
                         "Gaussian prior of the factored-out dims); rerun fit_pca")
    var = torch.as_tensor(pca["explained_variance"], dtype=torch.float64)
    dim = torch.as_tensor(pca["mean"]).shape[0]
    if var.shape != (dim,) or not torch.isfinite(var).all() or (var < 0).any():
        raise ValueError(f"PCA dict 'explained_variance' must be {dim} finite values >= 0, got "
                         f"shape {tuple(var.shape)}")
    mean = torch.as_tensor(pca["mean"], dtype=torch.float32) + DEQUANT_MEAN
    log_scale = 0.5 * torch.log(var[factored_dims:] + DEQUANT_VAR)
    return mean, log_scale.to(torch.float32)


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal [dim, dim] (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


class PatchLinear(nn.Module):
    """Invertible linear map along patch channels: `y = (x - mean) W^T` (paper App. B).

    Learnable (`learnable_w`: W a free [D, D] matrix initialised orthogonal, so perfectly
    conditioned at the start; the NLL's -log|det W| keeps it away from singular) or frozen
    (`pca`: W = PCA components, mean = patch mean). logdet = N * log|det W| per image.
    Runs in fp32 even under bf16 autocast (it must stay invertible).
    """

    def __init__(self, weight: torch.Tensor, mean: torch.Tensor | None = None,
                 trainable: bool = True):
        super().__init__()
        dim = weight.shape[0]
        mean = torch.zeros(dim) if mean is None else mean
        if trainable:
            self.weight = nn.Parameter(weight.clone())
        else:
            self.register_buffer("weight", weight.clone())
        self.register_buffer("mean", mean.clone())
        self.trainable = trainable

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight.to(x.dtype)
            y = (x - self.mean.to(x.dtype)) @ w.T                   # [B, N, D]
            logdet = x.shape[1] * torch.linalg.slogdet(w).logabsdet
        return y, logdet.expand(x.shape[0])                         # [B, N, D], [B]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            w = self.weight.to(torch.float64)
            # x^T = W^-1 y^T  <=>  x = y W^-T ; solve in float64 for an exact round trip
            x = torch.linalg.solve(w, y.to(torch.float64).reshape(-1, y.shape[-1]).T).T
            return x.reshape(y.shape).to(y.dtype) + self.mean.to(y.dtype)


def check_pca(pca: dict | None, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the `fit_pca` dict; returns (components [D, D], mean [D]) as float32."""
    if pca is None:
        raise ValueError("model.factoring='pca' needs the PCA dict from the fit_pca stage "
                         "(pca.out_path, e.g. models/pca.pt); got pca=None. Run `dvc repro "
                         "fit_pca` and pass it to ImageCodec/JetFormer (no identity fallback).")
    missing = [k for k in ("components", "mean") if k not in pca]
    if missing:
        raise ValueError(f"PCA dict is missing key(s) {missing}; has {sorted(pca)}")
    comps = torch.as_tensor(pca["components"], dtype=torch.float32)
    mean = torch.as_tensor(pca["mean"], dtype=torch.float32)
    if comps.shape != (dim, dim) or mean.shape != (dim,):
        raise ValueError(f"PCA dict shapes: components {tuple(comps.shape)}, mean "
                         f"{tuple(mean.shape)}; expected ({dim}, {dim}) and ({dim},) for "
                         f"3*patch_size^2 = {dim} (was PCA fitted with another patch size?)")
    if not (torch.isfinite(comps).all() and torch.isfinite(mean).all()):
        raise ValueError("PCA dict contains non-finite values")
    gram_err = (comps.double() @ comps.double().T - torch.eye(dim, dtype=torch.float64)).abs().max()
    if gram_err > 1e-3:
        raise ValueError(f"PCA components rows must be orthonormal (max |W W^T - I| = "
                         f"{gram_err:.2e} > 1e-3)")
    return comps, mean


class ImageCodec(nn.Module):
    """Model-space images `[B, H, W, 3]` <-> soft tokens `[B, N, d]` (+ factored rest).

    `model_cfg`: the model section of the config (`factoring`, `patch_size`, `factored_dims`,
    `flow`); `resolution`: the image side H = W; `seed`: initialises the flow's permutations
    and the learnable W."""

    def __init__(self, model_cfg, resolution: int, seed: int, pca: dict | None = None):
        super().__init__()
        m = model_cfg
        if m.factoring not in FACTORINGS:
            raise ValueError(f"model.factoring={m.factoring!r}: must be one of {list(FACTORINGS)}")
        if resolution <= 0 or resolution % m.patch_size:
            raise ValueError(f"ImageCodec: resolution={resolution} must be a positive multiple "
                             f"of model.patch_size={m.patch_size}")
        self.factoring = m.factoring
        self.patch_size = m.patch_size
        self.resolution = resolution
        self.num_tokens = (resolution // m.patch_size) ** 2          # N
        self.token_dim = 3 * m.patch_size ** 2                       # D = 3p^2
        self.factored_dims = (self.token_dim if m.factoring in ("none", "no_flow")
                              else m.factored_dims)                  # d
        if not 0 < self.factored_dims <= self.token_dim:
            raise ValueError(f"model.factored_dims={self.factored_dims}: must be in "
                             f"[1, {self.token_dim}]")

        self.linear = None
        # per-channel log-scale of the Gaussian prior of `rest` (pre-flow factorings only)
        self.rest_log_scale = None
        if m.factoring == "learnable_w":
            gen = torch.Generator().manual_seed(seed + 1)
            self.linear = PatchLinear(random_orthogonal(self.token_dim, gen), trainable=True)
            self.rest_log_scale = nn.Parameter(torch.zeros(self.rest_dims))
        elif m.factoring == "pca":
            comps, _ = check_pca(pca, self.token_dim)
            mean, log_scale = pca_prior_init(pca, self.factored_dims)
            self.linear = PatchLinear(comps, mean, trainable=False)
            self.rest_log_scale = nn.Parameter(log_scale)

        self.flow = None
        if m.factoring != "no_flow":
            flow_dim = self.factored_dims if self.linear is not None else self.token_dim
            if flow_dim < 2:
                raise ValueError(f"model.factored_dims={flow_dim}: factoring "
                                 f"'{m.factoring}' runs the flow on d dims, needs d >= 2")
            f = m.flow
            self.flow = Jet(self.num_tokens, flow_dim, f.num_couplings, f.width, f.depth,
                            f.num_heads, f.mlp_dim, f.dropout, seed=seed)

    @property
    def rest_dims(self) -> int:
        return self.token_dim - self.factored_dims

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, H, W, 3] (model space) -> tokens [B, N, d], rest [B, N, 3p^2 - d], logdet [B]."""
        R = self.resolution
        if x.ndim != 4 or x.shape[1:] != (R, R, 3):
            raise ValueError(f"ImageCodec.encode: expected images [B, {R}, {R}, 3] in model "
                             f"space, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError("ImageCodec.encode: expected float images in model space "
                             "(use jetformer.noise.to_model_space on uint8 pixels)")
        z = patchify(x, self.patch_size)                             # [B, N, D]
        d = self.factored_dims
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        if self.linear is not None:
            z, logdet = self.linear(z)                               # [B, N, D]
            tokens, rest = z[..., :d], z[..., d:]
            tokens, flow_logdet = self.flow(tokens)                  # [B, N, d]
            return tokens, rest, logdet + flow_logdet
        if self.flow is not None:
            z, logdet = self.flow(z)
        return z[..., :d], z[..., d:], logdet

    def decode(self, tokens: torch.Tensor, rest: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """tokens [B, N, d] (+ rest [B, N, 3p^2 - d], drawn untempered from the prior when None)
        -> x [B, H, W, 3] in model space, not clipped (big_vision
        `predict_fns.decode_images`: the clip to [-1, 1] comes with `from_model_space`).

        Always runs in fp32 with autocast off: a bf16 coupling net amplifies rounding through
        the couplings. Encode in fp32 too (no autocast) for an exact, lossless round trip."""
        with torch.autocast(tokens.device.type, enabled=False):
            return self._decode(tokens.float() if tokens.dtype in (torch.float16, torch.bfloat16)
                                else tokens, rest, generator)

    def _decode(self, tokens, rest, generator):
        if tokens.ndim != 3 or tokens.shape[1:] != (self.num_tokens, self.factored_dims):
            raise ValueError(f"ImageCodec.decode: expected tokens [B, {self.num_tokens}, "
                             f"{self.factored_dims}], got {tuple(tokens.shape)}")
        B, N, _ = tokens.shape
        if rest is None:  # drawn where the generator lives (a CPU generator works for CUDA too)
            rest = torch.randn(B, N, self.rest_dims, generator=generator,
                               device=generator.device if generator is not None else tokens.device,
                               dtype=tokens.dtype).to(tokens.device)
            if self.rest_log_scale is not None:
                rest = rest * self.rest_log_scale.detach().exp().to(rest)
        elif rest.shape != (B, N, self.rest_dims):
            raise ValueError(f"ImageCodec.decode: expected rest [{B}, {N}, {self.rest_dims}], "
                             f"got {tuple(rest.shape)}")
        if self.linear is not None:
            z = torch.cat([self.flow.inverse(tokens), rest.to(tokens.dtype)], dim=-1)
            z = self.linear.inverse(z)
        else:
            z = torch.cat([tokens, rest.to(tokens.dtype)], dim=-1)
            if self.flow is not None:
                z = self.flow.inverse(z)
        return unpatchify(z, self.patch_size, self.resolution, self.resolution)

    def rest_scale(self) -> torch.Tensor | None:
        """Per-channel std [3p^2 - d] of the prior of `rest`; None where it is N(0, I)."""
        return None if self.rest_log_scale is None else self.rest_log_scale.exp()

    def prior_nll(self, rest: torch.Tensor) -> torch.Tensor:
        """NLL in nats of the factored-out dims [B, N, 3p^2 - d], summed per image -> [B]:
        N(0, I) after the flow, N(0, diag(s^2)) before it (0.5 (r/s)^2 + log s + log(2 pi)/2)."""
        if rest.shape[-1] != self.rest_dims:
            raise ValueError(f"prior_nll: expected rest [..., {self.rest_dims}], got "
                             f"{tuple(rest.shape)}")
        if self.rest_log_scale is None:
            return standard_normal_nll(rest)
        rest = rest.float()
        log_s = self.rest_log_scale.float()
        nll = 0.5 * (rest * torch.exp(-log_s)) ** 2 + log_s + _HALF_LOG_2PI
        return nll.flatten(1).sum(dim=1)
