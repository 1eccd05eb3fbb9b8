"""Captioning / VQA fine-tune: the text loss falls, the flow is untouched (stop-gradient)."""
import torch

from conftest import make_tiny_cfg
from jetformer.data.tokenizer import train_tokenizer
from jetformer.eval.finetune import finetune, generate_captions
from jetformer.models.jetformer import JetFormer

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _items(n, size):
    items = []
    for i in range(n):
        name = list(COLOURS)[i % 2]
        img = (torch.tensor(COLOURS[name], dtype=torch.uint8).view(1, 1, 3)
               .expand(size, size, 3).clone())
        items.append({"id": str(i), "image": img, "label": i % 2, "captions": [f"a {name} square"],
                      "qa": [{"question": "what color is it?", "answers": [name] * 10,
                              "answer_type": "other", "question_type": "what color"}],
                      "attributes": {}})
    return items


def test_finetune_caption_and_vqa(tmp_path):
    tok = train_tokenizer(["a red square", "a blue square", "what color is it?", "red", "blue"] * 5,
                          tmp_path / "tok.model", vocab_size=40)
    cfg = make_tiny_cfg("model.decoder.dropout=0.0")
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=tok.vocab_size)
    flow_before = {k: v.clone() for k, v in model.codec.state_dict().items()}
    head_before = model.text_head.weight.detach().clone()
    items = _items(8, cfg.data.resolution)
    curve = finetune(model, cfg, items, tok, task="caption", steps=40, lr=3e-3, batch_size=8,
                     log=None)
    assert len(curve) == 40
    assert sum(c["loss"] for c in curve[-5:]) / 5 < 0.3 * curve[0]["loss"]
    assert curve[0]["lr"] < curve[3]["lr"]                      # warm-up, then cosine
    assert all(torch.equal(v, model.codec.state_dict()[k]) for k, v in flow_before.items())
    assert not torch.equal(head_before, model.text_head.weight)
    assert not model.training
    caps = generate_captions(model, tok, torch.stack([it["image"] for it in items[:2]]), max_len=8,
                             batch_size=2)
    assert caps == ["a red square", "a blue square"]
    vqa = finetune(model, cfg, items, tok, task="vqa", steps=5, lr=1e-3, batch_size=8, log=None)
    assert len(vqa) == 5 and all(c["loss"] == c["loss"] for c in vqa)   # finite (answer-only loss)


def test_finetune_with_dropout_is_reproducible_whatever_drew_from_the_global_rng(tmp_path):
    """Decoder dropout draws from torch's global RNG: the fine-tune seeds it itself, so the same
    seed gives the same curve even when something else consumed random numbers before."""
    tok = train_tokenizer(["a red square", "a blue square", "what color is it?", "red", "blue"] * 5,
                          tmp_path / "tok.model", vocab_size=40)
    cfg = make_tiny_cfg("model.decoder.dropout=0.3")
    items = _items(8, cfg.data.resolution)
    curves = []
    for draws_before in (0, 7):
        torch.manual_seed(0)
        model = JetFormer.from_config(cfg, vocab_size=tok.vocab_size)
        torch.rand(draws_before)
        curves.append([c["loss"] for c in finetune(model, cfg, items, tok, task="caption",
                                                   steps=3, lr=1e-3, batch_size=8, log=None)])
    assert curves[0] == curves[1]
