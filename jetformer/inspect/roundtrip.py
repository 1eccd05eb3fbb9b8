"""Text -> image -> text round trip: caption each generated image and score the caption against
the prompt that generated it. Two numbers, beside the judge's attribute accuracy:

  roundtrip_cider             CIDEr-D of the captions, the prompt as the single reference
  roundtrip_attribute_recall  the fraction of the attributes the prompt asked for (the scene's
                              main shape and colour, `eval.attributes.t2i_asked`) that the
                              caption names (whole words after PTB tokenisation)
"""
from __future__ import annotations

from jetformer.eval.cider import cider_score, ptb_tokenize


def names_attribute(caption: str, value: str) -> bool:
    """Whether `caption` names `value` ("light_blue" matches "a light blue circle") as words."""
    words = f" {ptb_tokenize(caption)} "
    return f" {ptb_tokenize(value.replace('_', ' '))} " in words


def roundtrip_scores(prompts: list[str], captions: list[str],
                     asked: list[dict[str, str]] | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-row records) of the round trip. `asked` (one dict per prompt, may be empty)
    gives the attributes the prompt asked for; without it the recall is None."""
    if len(prompts) != len(captions) or (asked is not None and len(asked) != len(prompts)):
        raise ValueError(f"round trip: {len(prompts)} prompts, {len(captions)} captions"
                         + ("" if asked is None else f", {len(asked)} attribute sets"))
    if len(prompts) < 2:
        raise ValueError("round trip: CIDEr needs at least 2 prompts")
    keys = list(range(len(prompts)))
    corpus, per = cider_score(dict(zip(keys, captions)), {k: [p] for k, p in zip(keys, prompts)})
    rows, hits, total = [], 0, 0
    for k in keys:
        row = {"index": k, "prompt": prompts[k], "caption": captions[k], "cider": per[k]}
        if asked is not None and asked[k]:
            found = {a: names_attribute(captions[k], v) for a, v in asked[k].items()}
            row.update({f"named_{a}": f for a, f in found.items()})
            hits, total = hits + sum(found.values()), total + len(found)
        rows.append(row)
    metrics = {"roundtrip_cider": corpus,
               "roundtrip_attribute_recall": hits / total if total else None,
               "roundtrip_num": len(prompts)}
    return metrics, rows
