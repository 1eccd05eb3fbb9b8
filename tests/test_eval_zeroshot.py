"""Zero-shot classification picks the right class on a JetFormer trained to prefer it."""
import torch

from jetformer.eval.zeroshot import zeroshot_classify, zeroshot_scores
from jetformer.models.jetformer import EOS_ID, JetFormer


def _solid(rgb, n, size):
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 1, 1, 3).expand(n, size, size, 3).clone()


def test_zeroshot_picks_the_class_the_model_prefers(make_cfg):
    cfg = make_cfg("model.decoder.dropout=0.0", "train.task=i2t")
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=16)
    size = cfg.data.resolution
    # three classes, each a colour; class names are token ids [5+c, EOS]
    colours = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]
    names = torch.tensor([[5, EOS_ID], [6, EOS_ID], [7, EOS_ID]])
    names_mask = torch.ones_like(names, dtype=torch.bool)
    images = torch.cat([_solid(c, 4, size) for c in colours])           # [12, H, W, 3]
    labels = torch.arange(3).repeat_interleave(4)
    # "built to prefer it": a few steps of captioning loss, image -> its class name
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"images": images, "text": names[labels], "text_mask": names_mask[labels],
             "image_first": torch.ones(12, dtype=torch.bool)}
    model.train()
    for _ in range(40):
        loss = model.compute_loss(batch, sigma_rgb=0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_images = torch.cat([_solid(c, 2, size) for c in colours[::-1]])  # reversed order
    pred, scores = zeroshot_classify(model, test_images, names, names_mask, batch_size=4)
    assert pred.tolist() == [2, 2, 1, 1, 0, 0]
    assert scores.shape == (6, 3) and bool((scores <= 0).all())
    # the tiled batch scores exactly what one score_text call per class gives
    for c in range(3):
        direct = model.score_text(test_images, names[c].expand(6, -1), names_mask[c].expand(6, -1))
        torch.testing.assert_close(scores[:, c], direct.float(), atol=1e-4, rtol=1e-4)
    # batch size does not change the result
    torch.testing.assert_close(
        zeroshot_scores(model, test_images, names, names_mask, batch_size=100),
        scores, atol=1e-4, rtol=1e-4)


def test_prompt_ensemble_is_the_log_sum_of_its_templates(make_cfg):
    """[P, C, T] prompts: score = log sum_p p(text_pc | image); one template = plain scoring."""
    cfg = make_cfg("model.decoder.dropout=0.0")
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=16).eval()
    images = _solid((200, 30, 30), 3, cfg.data.resolution)
    # two templates x two classes: "[9] name" and "[10] name", names 5 and 6
    text = torch.tensor([[[9, 5, EOS_ID], [9, 6, EOS_ID]], [[10, 5, EOS_ID], [10, 6, EOS_ID]]])
    mask = torch.ones_like(text, dtype=torch.bool)
    pred, scores = zeroshot_classify(model, images, text, mask, batch_size=4)
    per_template = torch.stack([zeroshot_scores(model, images, text[p], mask[p]) for p in range(2)])
    expected = (per_template.double().exp().sum(0)).log().float()          # by hand, no logsumexp
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert pred.tolist() == expected.argmax(1).tolist()
    one_template = zeroshot_classify(model, images, text[:1], mask[:1])[1]   # [1, C, T]
    torch.testing.assert_close(zeroshot_classify(model, images, text[0], mask[0])[1], one_template)
    torch.testing.assert_close(one_template, per_template[0])
