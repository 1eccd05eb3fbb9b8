"""VQAv2 accuracy with the official answer normalisation (GT-Vision-Lab/VQA, `vqaEval.py`).

Per question, with the 10 human answers a_1..a_10 and a prediction p:

    acc(p) = 1/10 · Σ_i min(#{j ≠ i : a_j == p} / 3, 1)

i.e. `min(#matches / 3, 1)` averaged over the 10 subsets of 9 annotators. Normalisation, as
in the official evaluator: the prediction gets punctuation stripping, lower-casing, number
words → digits, articles dropped and contractions restored; the human answers get the
punctuation step only, and only when they disagree among themselves.
"""
from __future__ import annotations

import re
from collections import defaultdict

# number words -> digits, articles dropped (official `manualMap`, `articles`)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# characters the official evaluator removes (or turns into spaces)
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
# a period not followed by a digit is removed ("3.5" keeps its period). The official regex is
# "(?!<=\d)(\.)(?!\d)", whose first group is a (mistyped) look-ahead that never matters.
PERIOD_STRIP = re.compile(r"\.(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def _contractions() -> dict[str, str]:
    """The official contraction table: every spelling of a contraction with exactly one
    apostrophe missing maps to the full form ("dont" -> "don't", "couldnt've" -> "couldn't've")."""
    forms = ("ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
             "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've "
             "isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
             "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
             "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
             "someone's something'd something'd've something'll that's there'd there'd've there're "
             "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't "
             "what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
             "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
             "y'all'd've you'd you'd've you'll you're you've").split()
    table = {}
    for form in forms:
        parts = form.split("'")
        for i in range(1, len(parts)):  # drop the i-th apostrophe
            table["'".join(parts[:i]) + parts[i] + "".join("'" + q for q in parts[i + 1:])] = form
    table["somebody'd"] = "somebodyd"   # (sic) in the official table
    return table


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a punctuation mark next to a space (or any text with a
    digit,digit comma) is deleted, otherwise it becomes a space; then stray periods go."""
    out = text
    glued = COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words -> digits, drop articles,
    restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The normalisation applied to a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy of one prediction against the human answers (normally 10)."""
    if not answers:
        raise ValueError("vqa_accuracy: a question needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_score(predictions: list[str], questions: list[dict]) -> dict:
    """Mean accuracy over questions, overall and per answer/question type.

    `questions[i]`: {"answers": [str]*10, optional "answer_type", "question_type"}.
    Returns {"accuracy", "per_answer_type", "per_question_type", "per_question"} (fractions in
    [0, 1]).
    """
    if len(predictions) != len(questions):
        raise ValueError(f"vqa_score: {len(predictions)} predictions for {len(questions)} "
                         f"questions")
    if not questions:
        raise ValueError("vqa_score: no questions")
    per_q = [vqa_accuracy(p, q["answers"]) for p, q in zip(predictions, questions)]
    by_answer, by_question = defaultdict(list), defaultdict(list)
    for acc, q in zip(per_q, questions):
        by_answer[q.get("answer_type", "")].append(acc)
        by_question[q.get("question_type", "")].append(acc)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"accuracy": mean(per_q),
            "per_answer_type": {k: mean(v) for k, v in sorted(by_answer.items())},
            "per_question_type": {k: mean(v) for k, v in sorted(by_question.items())},
            "per_question": per_q}
