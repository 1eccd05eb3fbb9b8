"""CIDEr (CIDEr-D, as in the COCO caption evaluation) with a pure-Python PTB-like tokenizer.

The scorer is pycocoevalcap's `Cider` (n-grams 1..4, tf-idf from the reference captions,
clipped cosine similarity, Gaussian length penalty σ = 6, ×10). pycocoevalcap's own tokenizer
shells out to the Stanford PTB tokenizer (Java); `ptb_tokenize` reproduces what matters for
the score: lower-casing, punctuation split off and dropped, clitics split ("don't" -> "do n't").
"""
from __future__ import annotations

import re
import unicodedata

from pycocoevalcap.cider.cider import Cider

# tokens pycocoevalcap removes after PTB tokenisation (plus the raw brackets/quotes that PTB
# would have turned into -LRB-, ``, '' before removing them)
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
               ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}", '"'}
TOKEN = re.compile(r"\w+(?:[-'.]\w+)*|\.\.\.|--|\S", re.UNICODE)
CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def ptb_tokenize(text: str) -> str:
    """'A man's RED-haired dog, isn't it?' -> "a man 's red-haired dog is n't it"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c",
                                                                      '"').replace("\u201d", '"')
    out = []
    for tok in TOKEN.findall(text):
        if tok.endswith("."):                  # sentence-final period glued by the word pattern
            tok = tok.rstrip(".") or tok
        m = CLITIC.match(tok)
        parts = [m.group(1), m.group(2)] if m else [tok]
        out.extend(p for p in parts if p not in PUNCTUATION)
    return " ".join(out)


def cider_score(predictions: dict, references: dict) -> tuple[float, dict]:
    """CIDEr-D of one predicted caption per image against that image's reference captions.

    predictions: {image_id: str}; references: {image_id: [str, ...]} (same keys).
    Returns (corpus score, {image_id: score}). Needs at least 2 images (idf uses log #images).
    """
    if set(predictions) != set(references):
        missing = sorted(set(references) ^ set(predictions), key=str)[:5]
        raise ValueError(f"cider_score: predictions and references cover different images, e.g. "
                         f"{missing}")
    if len(references) < 2:
        raise ValueError("cider_score: needs at least 2 images (idf is log(#images / df))")
    keys = list(references)
    res = {k: [ptb_tokenize(predictions[k])] for k in keys}
    gts = {}
    for k in keys:
        refs = [ptb_tokenize(r) for r in references[k]]
        if not refs:
            raise ValueError(f"cider_score: image {k!r} has no reference captions")
        gts[k] = refs
    score, scores = Cider().compute_score(gts, res)
    return float(score), {k: float(s) for k, s in zip(keys, scores)}
