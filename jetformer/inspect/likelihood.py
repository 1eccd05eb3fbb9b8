"""Per-patch likelihood maps: where the model spends its bits (paper eq. 1, §3.2).

The image NLL is a sum over the N patches of three parts, each in bits:

  gmm       -log2 p_GMM(token_i | token_<i, condition)      the transformer's soft tokens
  factored  -log2 p(rest_i)                                  the dims factored out (codec prior)
  logdet    -log2|det| of the flow at patch i + D_p log2(127.5)
            (the couplings' log-scales at patch i, the pre-flow linear map's share, and the
            change of units from [-1, 1] to pixel values)

so that  sum_i (gmm_i + factored_i + logdet_i) = the image's NLL in bits = bpd * H*W*3, with bpd
the model's `image_bits_per_dim`. Each patch has D_p = 3p^2 dims, so the mean of the per-patch
bits/dim is the image's bits/dim. A coupling's log-det is a sum over patches and channels of its
log-scales (`Coupling.token_logdet`), which is what assigns it to patches; its scales depend on
every patch (the coupling nets attend over the whole image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jetformer.models.gmm import gmm_nll
from jetformer.models.jet import patchify
from jetformer.models.jetformer import eval_mode
from jetformer.noise import PIXEL_SCALE, bits_per_dim, to_model_space

from .latents import check_images

LN2 = math.log(2.0)
PARTS = ("gmm", "factored", "logdet")


@dataclass
class PatchNLL:
    """Bits per patch [B, N] of each part; `total_bits` [B] is the model's own image NLL in bits
    (`JetFormer._text_first_image_nll`, the loss path), `bits_per_dim` [B] the same per dim."""
    gmm: torch.Tensor
    factored: torch.Tensor
    logdet: torch.Tensor
    total_bits: torch.Tensor
    bits_per_dim: torch.Tensor
    patch_dims: int
    grid: tuple[int, int]            # patches per column, per row

    @property
    def per_patch(self) -> torch.Tensor:
        """Total bits per patch [B, N] (sums to `total_bits`)."""
        return self.gmm + self.factored + self.logdet

    def maps(self, part: str = "total") -> torch.Tensor:
        """Bits per dim of each patch as a [B, h, w] map: `part` in PARTS or "total"."""
        if part not in PARTS + ("total",):
            raise ValueError(f"unknown part {part!r}: one of {list(PARTS + ('total',))}")
        bits = self.per_patch if part == "total" else getattr(self, part)
        return (bits / self.patch_dims).reshape(bits.shape[0], *self.grid)


def _flow_patch_logdet(flow, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Jet couplings on z [B, N, D]; returns (output, log-det per patch [B, N] in nats)."""
    per_patch = z.new_zeros(z.shape[:2])
    for coupling in flow.couplings:
        per_patch = per_patch + coupling.token_logdet(z)
        z, _ = coupling(z)
    return z, per_patch


def _codec_patch_logdet(codec, x: torch.Tensor) -> torch.Tensor:
    """Log-det (nats) of `codec.encode(x)` split per patch [B, N], for every factoring."""
    z = patchify(x, codec.patch_size)                               # [B, N, D]
    per_patch = z.new_zeros(z.shape[:2])
    if codec.linear is not None:                                    # N * log|det W|: 1/N each
        z, lin = codec.linear(z)
        per_patch = per_patch + (lin / z.shape[1])[:, None]
        z = z[..., :codec.factored_dims]
    if codec.flow is not None:
        per_patch = per_patch + _flow_patch_logdet(codec.flow, z)[1]
    return per_patch


@torch.no_grad()
def patch_nll(model, images: torch.Tensor, generator: torch.Generator | None = None, *,
              text=None, text_mask=None, labels=None, rtol: float = 1e-4) -> PatchNLL:
    """Per-patch NLL of uint8 images [B, H, W, 3] (dequantised with `generator`, as
    `JetFormer.image_bits_per_dim` does: the same seed gives the same noise and NLL).

    Conditioned on `text`/`labels` when given, else on the [NOLABEL] prefix. The per-patch
    parts are checked against the model's own total (relative tolerance `rtol`): a mismatch
    raises RuntimeError, so a change of the model's scoring cannot go unnoticed here."""
    check_images(images, model.codec.resolution)
    with eval_mode(model), torch.autocast(model.device.type, enabled=False):
        B, N = images.shape[0], model.num_image_tokens
        x = to_model_space(images.to(model.device), generator)
        tokens, rest, logdet, out, T = model.heldout_pass(x, text, text_mask, labels)
        total = model._text_first_image_nll(out, tokens, rest, logdet, T)[2]         # [B] nats
        gmm = gmm_nll(*model.gmm_head(out[:, T + 1: T + 1 + N]), tokens)             # [B, N]
        factored = model.codec.prior_nll(rest.reshape(B * N, 1, rest.shape[-1])).view(B, N)
        patch_logdet = _codec_patch_logdet(model.codec, x)
    D_p, side = model.codec.token_dim, model.codec.resolution // model.codec.patch_size
    parts = PatchNLL(gmm=gmm.double().cpu() / LN2, factored=factored.double().cpu() / LN2,
                     logdet=(-patch_logdet.double().cpu() / LN2 + D_p * math.log2(PIXEL_SCALE)),
                     total_bits=(total.double().cpu() / LN2
                                 + model.num_image_dims * math.log2(PIXEL_SCALE)),
                     bits_per_dim=bits_per_dim(total.double().cpu(), model.num_image_dims),
                     patch_dims=D_p, grid=(side, side))
    err = (parts.per_patch.sum(1) - parts.total_bits).abs()
    if bool((err > rtol * parts.total_bits.abs() + 1e-3).any()):
        raise RuntimeError(f"per-patch NLL does not sum to the model's total (max error "
                           f"{float(err.max()):.4g} bits): the model's scoring changed; update "
                           "jetformer/inspect/likelihood.py")
    return parts
