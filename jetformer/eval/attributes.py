"""Attribute accuracy of generated images: does the judge see what the prompt asked for?

A text-to-image prompt (a val caption) asks for its scene's main shape and colour (every
caption names both, api.md); a class sample asks for its class (a shape name in the shapes
world, else the label itself). Accuracy is the fraction of asked attributes the judge reads
back, averaged over samples.
"""
from __future__ import annotations


def t2i_asked(attributes: dict) -> dict[str, str]:
    """{"shape", "color"} of the scene's main object ({} for sources without attributes)."""
    main = (attributes.get("objects") or [{}])[0]
    return {k: str(main[k]) for k in ("shape", "color") if k in main}


def class_asked(label: int, classes: list[str], heads) -> dict[str, str]:
    """What a class sample asks for, in the judge's terms (shape names, or the label itself)."""
    if "shape" in heads:
        return {"shape": classes[label]}
    return {"label": str(label)} if "label" in heads else {}


def attribute_accuracy(judged: dict[str, list[str]], asked: list[dict[str, str]]) -> tuple[float,
                                                                                           list]:
    """(mean over samples that ask for something, per-sample fraction or None)."""
    per = [sum(judged[h][i] == v for h, v in a.items()) / len(a) if a else None for i,
           a in enumerate(asked)]
    scored = [p for p in per if p is not None]
    return (sum(scored) / len(scored) if scored else float("nan")), per
