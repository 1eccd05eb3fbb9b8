"""ImageCodec: pixels in model space <-> soft tokens, for every factoring variant (paper §3.2,
App. B, Table 2).

Every dimension of the image is scored exactly once: the first `factored_dims` dims of each
latent token go to the transformer (`tokens`), the rest (`rest`) are scored here by `prior_nll`
under N(0, I), and `logdet` carries the change of variables of everything invertible.

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

from .jet import Jet, patchify, unpatchify

FACTORINGS = ("post_flow", "learnable_w", "pca", "none", "no_flow")


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
    """Model-space images `[B, H, W, 3]` <-> soft tokens `[B, N, d]` (+ factored rest)."""

    def __init__(self, cfg, pca: dict | None = None):
        super().__init__()
        m = cfg.model
        if m.factoring not in FACTORINGS:
            raise ValueError(f"model.factoring={m.factoring!r}: must be one of {list(FACTORINGS)}")
        self.factoring = m.factoring
        self.patch_size = m.patch_size
        self.resolution = cfg.data.resolution
        self.num_tokens = cfg.num_image_tokens
        self.token_dim = cfg.token_dim                               # D = 3p^2
        self.factored_dims = (self.token_dim if m.factoring in ("none", "no_flow")
                              else m.factored_dims)                  # d
        if not 0 < self.factored_dims <= self.token_dim:
            raise ValueError(f"model.factored_dims={self.factored_dims}: must be in "
                             f"[1, {self.token_dim}]")

        self.linear = None
        if m.factoring == "learnable_w":
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            self.linear = PatchLinear(random_orthogonal(self.token_dim, gen), trainable=True)
        elif m.factoring == "pca":
            comps, mean = check_pca(pca, self.token_dim)
            self.linear = PatchLinear(comps, mean, trainable=False)

        self.flow = None
        if m.factoring != "no_flow":
            flow_dim = self.factored_dims if self.linear is not None else self.token_dim
            if flow_dim < 2:
                raise ValueError(f"model.factored_dims={flow_dim}: factoring "
                                 f"'{m.factoring}' runs the flow on d dims, needs d >= 2")
            f = m.flow
            self.flow = Jet(self.num_tokens, flow_dim, f.num_couplings, f.width, f.depth,
                            f.num_heads, f.mlp_dim, f.dropout, seed=cfg.seed)

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
        """tokens [B, N, d] (+ rest [B, N, 3p^2 - d], drawn from N(0, I) untempered when None)
        -> x [B, H, W, 3] in model space, not clipped (facts items 6, 19).

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

    def prior_nll(self, rest: torch.Tensor) -> torch.Tensor:
        """NLL in nats of the factored-out dims under N(0, I), summed per image -> [B]."""
        if rest.dtype in (torch.float16, torch.bfloat16):
            rest = rest.float()
        nll = 0.5 * (rest ** 2 + math.log(2 * math.pi))
        return nll.flatten(1).sum(dim=1)
