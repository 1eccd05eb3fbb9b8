"""Images <-> the model's latents for inspection: the flow's soft tokens and the factored-out
dims, with an exact pixel round trip.

Images are encoded at the centre of their dequantisation bin, x = I/127.5 - 1 + 0.5/127.5 (the
mean of the training-time noise u ~ U(0, 1/127.5), as `JetFormer._encode_clean` does), and
decoded by removing that offset before rounding, so encode -> decode returns the input pixel
for pixel (the flow is exactly invertible up to float rounding, far below half a pixel).
"""
from __future__ import annotations

import torch

from jetformer.noise import PIXEL_SCALE, from_model_space, to_model_space

CENTRE = 0.5 / PIXEL_SCALE   # mean dequantisation offset in model space


def check_images(images: torch.Tensor, resolution: int) -> None:
    """Raise ValueError unless `images` is uint8 [B, R, R, 3]."""
    if (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4
            or tuple(images.shape[1:]) != (resolution, resolution, 3)):
        got = ((images.dtype, tuple(images.shape)) if isinstance(images, torch.Tensor)
               else type(images))
        raise ValueError(f"expected uint8 images [B, {resolution}, {resolution}, 3], got {got}")


@torch.no_grad()
def encode_image(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] -> (tokens [B, N, d], rest [B, N, 3p^2 - d]) via `model.codec.encode`,
    fp32, autocast off (the flow's exact round trip needs full precision)."""
    check_images(images, model.codec.resolution)
    x = to_model_space(images.to(model.device), dequantize=False) + CENTRE
    with torch.autocast(model.device.type, enabled=False):
        tokens, rest, _ = model.codec.encode(x)
    return tokens.float(), rest.float()


@torch.no_grad()
def decode_latents(model, tokens: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(tokens, rest) -> uint8 [B, H, W, 3] via `model.codec.decode` (inverse of `encode_image`)."""
    return from_model_space(model.codec.decode(tokens, rest) - CENTRE).cpu()


@torch.no_grad()
def prior_rest(model, tokens: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """A draw of the factored-out dims [B, N, 3p^2 - d] from the model's OWN prior: decode with
    `rest=None` (the codec draws them as when sampling) and re-encode (the codec is invertible),
    so this follows whatever prior `ImageCodec.decode` uses."""
    with torch.autocast(tokens.device.type, enabled=False):
        x = model.codec.decode(tokens.float(), None, generator=generator)
        return model.codec.encode(x)[1].float()
