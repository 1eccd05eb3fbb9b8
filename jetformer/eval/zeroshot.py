"""Zero-shot classification by scoring class names (paper §4, Fig. 4; official-code facts 21):
predict argmax_c log p(name_c | image), the text scored after the image prefix [BOI, img, BOS]."""
from __future__ import annotations

import torch


@torch.no_grad()
def zeroshot_scores(model, images: torch.Tensor, class_text: torch.Tensor, class_mask: torch.Tensor,
                    *, batch_size: int = 50) -> torch.Tensor:
    """log p(class text | image) in nats, [N, C].

    images uint8 [N,H,W,3]; class_text long [C,T] (tokenised names, EOS included), class_mask bool
    [C,T]. Each image batch is repeated C times so all class names are scored in one call."""
    C = class_text.shape[0]
    if C < 2:
        raise ValueError(f"zero-shot classification needs >= 2 classes, got {C}")
    rows = max(1, batch_size // C)
    out = []
    for i in range(0, len(images), rows):
        x = images[i:i + rows]
        b = x.shape[0]
        xs = x.repeat_interleave(C, dim=0)                           # [b*C, H, W, 3]: img0 x C, img1 x C ...
        text = class_text.repeat(b, 1)                               # [b*C, T]:     name0..nameC-1, ...
        mask = class_mask.repeat(b, 1)
        out.append(model.score_text(xs, text, mask).float().cpu().view(b, C))
    return torch.cat(out)


def zeroshot_classify(model, images, class_text, class_mask, *, batch_size: int = 50):
    """(predicted class long [N], scores [N, C])."""
    scores = zeroshot_scores(model, images, class_text, class_mask, batch_size=batch_size)
    return scores.argmax(dim=1), scores
