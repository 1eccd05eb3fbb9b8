"""Zero-shot classification by scoring class names (paper §4, Fig. 4):
predict argmax_c log p(name_c | image), the text scored after the image prefix [BOI, img, BOS].

With several prompt templates per class (a CLIP-style ensemble, e.g. "a red {}", "a blue {}")
the class score is log Σ_t p(t(name_c) | image): the probability that the caption is any of the
class's phrasings. One template "{}" is the paper's bare class name."""
from __future__ import annotations

import torch

from jetformer.progress import progress


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
    for i in progress(range(0, len(images), rows), "zero-shot"):
        x = images[i:i + rows]
        b = x.shape[0]
        xs = x.repeat_interleave(C, dim=0)      # [b*C, H, W, 3]: img0 x C, img1 x C ...
        text = class_text.repeat(b, 1)          # [b*C, T]:     name0..nameC-1, ...
        mask = class_mask.repeat(b, 1)
        out.append(model.score_text(xs, text, mask).float().cpu().view(b, C))
    return torch.cat(out)


def zeroshot_classify(model, images, class_text, class_mask, *, batch_size: int = 50):
    """(predicted class long [N], scores [N, C]).

    class_text/class_mask: [C, T] (one text per class) or [P, C, T] (P prompt templates per
    class; scores are then log Σ_p p(text_pc | image))."""
    if class_text.dim() == 2:
        class_text, class_mask = class_text[None], class_mask[None]
    if class_text.dim() != 3 or class_mask.shape != class_text.shape:
        raise ValueError(f"class_text must be [C, T] or [P, C, T] with a mask of the same shape, "
                         f"got {tuple(class_text.shape)} and {tuple(class_mask.shape)}")
    scores = torch.logsumexp(torch.stack([
        zeroshot_scores(model, images, t, m, batch_size=batch_size)
        for t, m in zip(class_text, class_mask)]), dim=0)                # [N, C]
    return scores.argmax(dim=1), scores
