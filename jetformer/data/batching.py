"""Dataset items -> model batches (api.md `jetformer.data.batching`).

Text is tokenised here: pad 0, each sequence ends with one EOS. Randomness (which caption,
which question) comes from the caller's `torch.Generator`, so a batch is reproducible.
"""
from __future__ import annotations

from collections import Counter

import torch

from jetformer.data.tokenizer import EOS_ID, PAD_ID


def _pick(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (), generator=generator))


def _common(items: list[dict]) -> dict:
    return {"images": torch.stack([it["image"] for it in items]),               # [B, H, W, 3] uint8
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}  # [B]


def caption_batch(items: list[dict], tokenizer, max_len: int,
                  generator: torch.Generator | None = None) -> dict:
    """`{"images" uint8 [B,H,W,3], "text" long [B,T], "text_mask" bool [B,T], "labels" long [B]}`
    with one random caption per image (T = max_len)."""
    texts = []
    for it in items:
        if not it["captions"]:
            raise ValueError(f"item {it['id']!r} has no captions (use a captioned source, "
                             "e.g. data.source=synthetic or coco, or train.task=class)")
        texts.append(it["captions"][_pick(len(it["captions"]), generator)])
    text, text_mask = tokenizer.encode_batch(texts, max_len)
    return {**_common(items), "text": text, "text_mask": text_mask}


def majority_answer(answers: list[str]) -> str:
    """The most frequent of the annotators' answers (first seen wins a tie)."""
    counts = Counter(answers)
    return max(answers, key=lambda a: counts[a])


def qa_tokens(tokenizer, question: str, answer: str, max_len: int) -> tuple[list[int], int]:
    """Question ids then answer ids then EOS, at most `max_len` tokens (the question is cut
    first); returns (ids, number of question tokens)."""
    q = tokenizer.encode(question, eos=False)
    a = tokenizer.encode(answer, eos=False)[: max_len - 1] + [EOS_ID]
    q = q[: max_len - len(a)]
    return q + a, len(q)


def vqa_batch(items: list[dict], tokenizer, max_len: int,
              generator: torch.Generator | None = None) -> dict:
    """One random question per image. `text` = question tokens, answer tokens, EOS;
    `text_loss_mask` marks the answer tokens and the EOS; `prefix`/`prefix_mask` hold the
    question alone (for generating the answer)."""
    B = len(items)
    text = torch.full((B, max_len), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros(B, max_len, dtype=torch.bool)
    prefix = torch.full((B, max_len), PAD_ID, dtype=torch.long)
    for b, it in enumerate(items):
        if not it["qa"]:
            raise ValueError(f"item {it['id']!r} has no questions "
                             "(use data.source=synthetic or vqav2)")
        qa = it["qa"][_pick(len(it["qa"]), generator)]
        ids, n_q = qa_tokens(tokenizer, qa["question"], majority_answer(qa["answers"]), max_len)
        text[b, : len(ids)] = torch.tensor(ids)
        loss_mask[b, n_q: len(ids)] = True
        prefix[b, :n_q] = torch.tensor(ids[:n_q], dtype=torch.long)
    return {**_common(items), "text": text, "text_mask": text != PAD_ID,
            "text_loss_mask": loss_mask, "prefix": prefix, "prefix_mask": prefix != PAD_ID}
