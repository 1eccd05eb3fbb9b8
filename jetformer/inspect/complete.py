"""Image completion: keep the latent tokens of the first K patch rows of an image and sample the
rest autoregressively with the model's own sampler (`JetFormer._sample_tokens`: the GMM head,
GIVT's CFG rejection sampler when cfg_scale > 0, the KV cache), conditioned on text or a class
label when given, else on the [NOLABEL] prefix (paper §3, "Sampling").

The kept patches keep all their latent dims (soft tokens and factored-out dims); the completed
patches draw their factored-out dims from the model's prior (`latents.prior_rest`). The flow's
couplings attend over all patches, so the decoded kept rows change when the completed patches
do: `Completion.drift` measures by how much (pixel units, over the kept pixel rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from jetformer.models.jetformer import eval_mode

from .latents import decode_latents, encode_image, prior_rest


@dataclass
class Completion:
    """`samples` uint8 [B, S, H, W, 3] (S per image), their latent `tokens` [B, S, N, d],
    the inputs' `input_tokens` [B, N, d], `kept_tokens` = K * patches per row, `kept_pixel_rows`
    = K * patch size, and `drift`: mean / max |decoded - input| over the kept pixel rows, per
    image and sample ([B, S] tensors of pixel values), and the fraction of those pixels changed."""
    samples: torch.Tensor
    tokens: torch.Tensor
    input_tokens: torch.Tensor
    kept_tokens: int
    kept_pixel_rows: int
    drift: dict

    def drift_summary(self) -> dict[str, float]:
        """Means over images and samples of the drift measures (floats, for metrics files)."""
        return {f"kept_rows_{k}": float(v.double().mean()) for k, v in self.drift.items()}


def kept_row_drift(decoded: torch.Tensor, images: torch.Tensor, rows: int) -> dict:
    """Drift of the first `rows` pixel rows: decoded uint8 [B, S, H, W, 3] vs images [B, H, W, 3]
    -> {"mean_abs_px", "max_abs_px", "changed_frac"}, each [B, S] (zeros when rows = 0)."""
    B, S = decoded.shape[:2]
    if rows == 0:
        z = torch.zeros(B, S, dtype=torch.float64)
        return {"mean_abs_px": z, "max_abs_px": z.clone(), "changed_frac": z.clone()}
    d = (decoded[:, :, :rows].double() - images[:, None, :rows].double()).abs().flatten(2)
    return {"mean_abs_px": d.mean(2), "max_abs_px": d.amax(2),
            "changed_frac": (d > 0).double().mean(2)}


@torch.no_grad()
def complete(model, images: torch.Tensor, keep_rows: int, *, text=None, text_mask=None,
             labels=None, num_samples: int = 4, cfg_scale: float = 0.0, temperature: float = 1.0,
             seed: int = 0) -> Completion:
    """Complete uint8 images [B, H, W, 3] from their first `keep_rows` patch rows, `num_samples`
    times each. `text` long [B, T] (+ `text_mask`) or `labels` long [B] condition each image;
    cfg_scale > 0 needs one of them. Deterministic for a fixed `seed` (one seeded generator)."""
    per_row = model.codec.resolution // model.codec.patch_size           # square patch grid
    if not 0 <= keep_rows <= per_row:
        raise ValueError(f"keep_rows={keep_rows}: must be in [0, {per_row}] (patch rows of the "
                         "image)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if cfg_scale < 0 or not temperature > 0:
        raise ValueError(f"need cfg_scale >= 0 and temperature > 0, got {cfg_scale}, {temperature}")
    if cfg_scale > 0 and text is None and labels is None:
        raise ValueError("cfg_scale > 0 needs a condition (text or labels) to guide towards")
    B, S, N = images.shape[0], num_samples, model.num_image_tokens
    tokens_in, rest_in = encode_image(model, images)                        # [B, N, d], [B, N, r]
    kept = keep_rows * per_row

    def rep(t):  # one row per sample, image-major
        return None if t is None else t.to(model.device).repeat_interleave(S, dim=0)

    tokens = rep(tokens_in)                                                 # [B*S, N, d]
    g = torch.Generator(device=model.device).manual_seed(seed)
    with eval_mode(model):
        if kept < N:
            if text is None and labels is None:
                cond = model._unconditional(B * S)
            else:
                cond = model._condition(rep(text), rep(text_mask), rep(labels), None)
            prefix = _with_kept(model, model._text_first_prefix(*cond), tokens[:, :kept])
            uncond = None
            if cfg_scale > 0:
                T = None if model.conditioning == "class" else cond[0].shape[1]
                uncond = model._text_first_prefix(*model._unconditional(B * S, T))
                uncond = _with_kept(model, uncond, tokens[:, :kept])
            # the model's sampler draws N tokens after any prefix: the first N - kept are used
            drawn = model._sample_tokens(prefix, uncond, cfg_scale, temperature, g, True)
            tokens = torch.cat([tokens[:, :kept], drawn[:, :N - kept].float()], dim=1)
        rest = prior_rest(model, tokens, g)
        rest[:, :kept] = rep(rest_in)[:, :kept]
        decoded = decode_latents(model, tokens, rest)                       # [B*S, H, W, 3]
    decoded = decoded.unflatten(0, (B, S))
    rows = keep_rows * model.codec.patch_size
    return Completion(samples=decoded, tokens=tokens.cpu().unflatten(0, (B, S)),
                      input_tokens=tokens_in.cpu(), kept_tokens=kept, kept_pixel_rows=rows,
                      drift=kept_row_drift(decoded, images.cpu(), rows))


def _with_kept(model, prefix, kept_tokens):
    """Append the kept soft tokens' embeddings to a prefix (h [R, P, W], valid [R, P])."""
    h, valid = prefix
    if kept_tokens.shape[1] == 0:
        return h, valid
    emb = model.image_embed(kept_tokens.to(model.image_embed.weight.dtype))
    return torch.cat([h, emb], dim=1), torch.cat([valid, valid.new_ones(kept_tokens.shape[:2])], 1)
