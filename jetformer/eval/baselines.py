"""Trivial baselines, measured in the same run as the model (issue 5, "Quality"):

- attribute accuracy of a generator that always draws the most frequent asked value;
- CIDEr of a constant caption: the most common training caption, for every image;
- VQA accuracy of the most common training answer per question type;
- zero-shot accuracy of always predicting the most frequent training class.
"""
from __future__ import annotations

from collections import Counter

from jetformer.eval.cider import cider_score, ptb_tokenize
from jetformer.eval.vqa import normalize_answer, vqa_score


def most_frequent_rate(values: list) -> float:
    """Share of the most frequent value: the accuracy of a constant answer that always gives it."""
    if not values:
        raise ValueError("most_frequent_rate: no values")
    return Counter(values).most_common(1)[0][1] / len(values)


def constant_attribute_accuracy(asked: list[dict[str, str]]) -> float:
    """Attribute accuracy (mean over the asked attributes) of a generator whose every image
    shows the most frequent asked value of each attribute."""
    heads = sorted({h for a in asked for h in a})
    if not heads:
        raise ValueError("constant_attribute_accuracy: nothing asked")
    return sum(most_frequent_rate([a[h] for a in asked if h in a]) for h in heads) / len(heads)


def most_common_caption(train_captions: list[str]) -> str:
    """The most common training caption (compared after PTB tokenisation)."""
    if not train_captions:
        raise ValueError("most_common_caption: no training captions")
    counts = Counter(ptb_tokenize(c) for c in train_captions)
    best = counts.most_common(1)[0][0]
    return next(c for c in train_captions if ptb_tokenize(c) == best)


def constant_caption_cider(train_captions: list[str], references: dict) -> tuple[float, str]:
    """(CIDEr, caption) of answering every image with the most common training caption."""
    caption = most_common_caption(train_captions)
    score, _ = cider_score({k: caption for k in references}, references)
    return score, caption


def answer_per_question_type(train_questions: list[dict]) -> dict[str, str]:
    """{question_type: most common normalised training answer} (all 10 answers counted)."""
    counts: dict[str, Counter] = {}
    for q in train_questions:
        counts.setdefault(q.get("question_type", ""),
                          Counter()).update(normalize_answer(a) for a in q["answers"])
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def per_type_vqa_accuracy(train_questions: list[dict], val_questions: list[dict]) -> float:
    """VQA accuracy of the most common training answer of each question type (the overall most
    common answer for a type never seen in training)."""
    table = answer_per_question_type(train_questions)
    overall = Counter(normalize_answer(a) for q in train_questions
                      for a in q["answers"]).most_common(1)[0][0]
    preds = [table.get(q.get("question_type", ""), overall) for q in val_questions]
    return vqa_score(preds, val_questions)["accuracy"]


def majority_class_accuracy(train_labels: list[int], val_labels: list[int]) -> float:
    """Accuracy on val of always predicting the most frequent training class."""
    top = Counter(train_labels).most_common(1)[0][0]
    return sum(int(y == top) for y in val_labels) / len(val_labels)
