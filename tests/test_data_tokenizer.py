"""TextTokenizer (special ids, EOS, padding, truncation) and the caption / VQA batches."""
import io

import numpy as np
import pytest
import sentencepiece as spm
import torch

from jetformer.data.batching import caption_batch, majority_answer, vqa_batch
from jetformer.data.synthetic import make_captions, make_qa, sample_scene
from jetformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextTokenizer, train_tokenizer


def world_items(n: int) -> list[dict]:
    items = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        scene = sample_scene(rng)
        items.append({"id": str(i), "image": torch.full((4, 4, 3), i, dtype=torch.uint8),
                      "label": i % 4, "captions": make_captions(scene, rng),
                      "qa": make_qa(scene, rng), "attributes": scene})
    return items


@pytest.fixture(scope="module")
def items():
    return world_items(60)


@pytest.fixture(scope="module")
def tok(items, tmp_path_factory):
    texts = [c for it in items for c in it["captions"]]
    texts += [x for it in items for q in it["qa"] for x in [q["question"], *set(q["answers"])]]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model",
                           vocab_size=100)


def test_special_ids_and_round_trip(tok):
    assert ((tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id())
            == (PAD_ID, UNK_ID, BOS_ID, EOS_ID))
    assert tok.vocab_size == 100
    ids = tok.encode("a red circle on the left")
    assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1] and PAD_ID not in ids
    assert tok.decode(ids) == "a red circle on the left"
    assert tok.decode(ids + [PAD_ID, 17, 18]) == "a red circle on the left"     # stops at EOS
    assert UNK_ID in tok.encode("zebra ☃")                                        # unseen chars


def test_encode_batch_pads_and_truncates(tok):
    texts = ["a red circle", "there is a purple triangle on the right and two small shapes"]
    tokens, mask = tok.encode_batch(texts, 8)
    assert (tokens.shape == mask.shape == (2, 8) and tokens.dtype == torch.long
            and mask.dtype == torch.bool)
    n0 = len(tok.encode(texts[0]))
    assert tokens[0, :n0].tolist() == tok.encode(texts[0]) and (tokens[0, n0:] == PAD_ID).all()
    assert mask[0].tolist() == [True] * n0 + [False] * (8 - n0)
    # cut, EOS kept
    assert tokens[1].tolist() == tok.encode(texts[1])[:7] + [EOS_ID] and mask[1].all()


def test_caption_batch(items, tok):
    b = caption_batch(items[:8], tok, 32, torch.Generator().manual_seed(0))
    assert set(b) == {"images", "text", "text_mask", "labels"}
    assert b["images"].shape == (8, 4, 4, 3) and b["images"].dtype == torch.uint8
    assert b["labels"].tolist() == [i % 4 for i in range(8)]
    picked = [tok.decode(row) for row in b["text"]]
    assert all(p in it["captions"] for p, it in zip(picked, items))
    again = caption_batch(items[:8], tok, 32, torch.Generator().manual_seed(0))
    assert torch.equal(again["text"], b["text"])
    many = {tok.decode(caption_batch(items[:1], tok, 24,
                                     torch.Generator().manual_seed(s))["text"][0])
            for s in range(30)}
    assert len(many) > 1                                                          # a random caption


def test_vqa_batch_masks_only_the_answer(items, tok):
    b = vqa_batch(items[:16], tok, 32, torch.Generator().manual_seed(1))
    assert ({"text", "text_mask", "text_loss_mask", "prefix", "prefix_mask", "images", "labels"}
            <= set(b))
    for row in range(16):
        text, loss, prefix = b["text"][row], b["text_loss_mask"][row], b["prefix"][row]
        n = int(b["text_mask"][row].sum())
        n_q = int(b["prefix_mask"][row].sum())
        assert text[n - 1] == EOS_ID and (text == EOS_ID).sum() == 1
        assert torch.equal(text[:n_q], prefix[:n_q])
        assert loss.tolist() == [False] * n_q + [True] * (n - n_q) + [False] * (32 - n)
        question, answer = tok.decode(prefix), tok.decode(text[n_q:n])
        qa = next(q for q in items[row]["qa"] if q["question"] == question)
        assert answer == majority_answer(qa["answers"])


def test_vqa_truncation_keeps_answer_and_eos(items, tok):
    b = vqa_batch(items[:4], tok, 4, torch.Generator().manual_seed(0))
    assert (b["text"][:, -1] == EOS_ID).logical_or(b["text_mask"].sum(1) < 4).all()
    assert b["text_loss_mask"].any(1).all()


def test_majority_answer():
    assert majority_answer(["2", "two", "2", "3", "2", "2", "2", "two", "2", "2"]) == "2"
    assert majority_answer(["yes", "no"]) == "yes"


def test_given_model_with_other_special_ids_is_refused(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle", "a blue square"] * 20),
                                   model_writer=model, vocab_size=20, hard_vocab_limit=False,
                                   minloglevel=2)
    path = tmp_path / "other.model"
    path.write_bytes(model.getvalue())         # sentencepiece defaults: unk 0, bos 1, eos 2, pad -1
    with pytest.raises(ValueError, match="special ids"):
        TextTokenizer(path)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        TextTokenizer(tmp_path / "missing.model")


def test_training_texts_from_prepared_data_and_deterministic_model(tmp_path):
    from jetformer.config import REPO_ROOT, load_config
    from jetformer.data.prepare import prepare
    from jetformer.data.tokenizer import training_texts
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=(
        f"data.synthetic.out_dir={tmp_path / 'raw'}", f"data.prepared_dir={tmp_path / 'prepared'}",
        "data.synthetic.num_train=12", "data.synthetic.num_val=2", "data.synthetic.bad_files=false",
        "data.resolution=8", "data.workers=1"))
    prepare(cfg)
    texts = training_texts(tmp_path / "prepared")
    assert texts[:4] == ["circle", "cross", "square", "triangle"]              # class names first
    assert len(texts) > 4 + 12 * 5 + 12 * 4                         # + captions, questions, answers
    a = train_tokenizer(texts, tmp_path / "a.model", 64)
    train_tokenizer(texts, tmp_path / "b.model", 64)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.decode(a.encode(texts[10])) == texts[10]
