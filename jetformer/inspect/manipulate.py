"""Latent manipulations of one image (paper App. D, Fig. 6): re-decode its latents after

  (a) the factored-out dims replaced by zeros,
  (b) the factored-out dims replaced by fresh N(0, I) draws,
  (c) the modelled dims (the transformer's soft tokens) of horizontally neighbouring patches
      swapped (patch columns 0<->1, 2<->3, ...),
  (d) Gaussian noise of increasing scale added to the modelled dims,
  (e) nothing changed: through the flow only (encode -> decode).

(e) comes first: it is the input pixel for pixel (the flow is invertible), the reference each
other cell reads against.
"""
from __future__ import annotations

import torch

from .latents import decode_latents, encode_image

NOISE_SCALES = (0.1, 0.3, 1.0)


def swap_neighbours(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Swap the tokens [B, N, d] of patch columns 2j and 2j+1 in every patch row (an odd last
    column stays in place)."""
    h, w = grid
    t = tokens.reshape(tokens.shape[0], h, w, -1).clone()
    pairs = w - w % 2
    t[:, :, :pairs] = t[:, :, :pairs].unflatten(2, (pairs // 2, 2)).flip(3).flatten(2, 3)
    return t.reshape(tokens.shape)


@torch.no_grad()
def manipulations(model, image: torch.Tensor, seed: int = 0,
                  noise_scales: tuple[float, ...] = NOISE_SCALES) -> list[tuple[str, torch.Tensor]]:
    """[(label, uint8 [H, W, 3])] for one uint8 image [H, W, 3]: (e) the unchanged latents
    decoded, then (a)-(d) above ((a), (b) only when the model factors dims out). `seed` fixes
    the random draws of (b) and (d)."""
    if not all(s > 0 for s in noise_scales):
        raise ValueError(f"noise scales must be > 0, got {list(noise_scales)}")
    if image.ndim != 3:
        raise ValueError(f"manipulations: expected one image [H, W, 3], got {tuple(image.shape)}")
    tokens, rest = encode_image(model, image[None])
    g = torch.Generator().manual_seed(seed)
    p = model.codec.patch_size
    grid = (image.shape[0] // p, image.shape[1] // p)

    def randn(like):
        return torch.randn(like.shape, generator=g).to(like)

    cells = [("(e) flow only: encode -> decode", (tokens, rest))]
    if rest.shape[-1] > 0:
        cells += [("(a) factored dims = 0", (tokens, torch.zeros_like(rest))),
                  ("(b) factored dims ~ N(0, I)", (tokens, randn(rest)))]
    cells.append(("(c) neighbours' tokens swapped", (swap_neighbours(tokens, grid), rest)))
    cells += [(f"(d) tokens + {s:g} N(0, I)", (tokens + s * randn(tokens), rest))
              for s in noise_scales]
    return [(label, decode_latents(model, t, r)[0]) for label, (t, r) in cells]
