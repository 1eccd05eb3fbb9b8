"""JetFormer model: loss layout and masking, bits/dim constants, KV-cache sampling and decoding,
CFG, zero-shot scoring, overfitting, EMA."""
import math

import pytest
import torch

from jetformer.models.ema import EMA
from jetformer.models.jetformer import EOS_ID, JetFormer, Objective, eval_mode
from jetformer.noise import to_model_space

VOCAB = 16
PALETTE = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)


def toy_pairs(B=8, R=8, T=8):
    """Images of a coloured square on a coloured background; caption = [bg, fg, EOS, pad..]."""
    bg = torch.arange(B) % 4
    fg = (torch.arange(B) // 4 + bg + 1) % 4
    images = PALETTE[bg][:, None, None, :].expand(B, R, R, 3).clone()
    images[:, R // 4: 3 * R // 4, R // 4: 3 * R // 4] = PALETTE[fg][:, None, None, :]
    text = torch.zeros(B, T, dtype=torch.long)
    text[:, 0], text[:, 1], text[:, 2] = 4 + bg, 8 + fg, EOS_ID
    return {"images": images, "text": text, "text_mask": text != 0}


def random_text(B, T, g, min_len=2):
    """Random captions of different lengths (ending with EOS, right-padded with 0)."""
    lens = torch.randint(min_len, T + 1, (B,), generator=g)
    text = torch.randint(4, VOCAB, (B, T), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]
    text = torch.where(mask, text, 0)
    text[torch.arange(B), lens - 1] = EOS_ID
    return text, mask


@pytest.fixture
def text_model(make_cfg, randomize):
    torch.manual_seed(0)
    model = JetFormer.from_config(make_cfg("model.decoder.dropout=0.0"), vocab_size=VOCAB)
    return randomize(model, std=0.05, out_std=0.2).eval()


@pytest.fixture
def class_model(make_cfg, randomize):
    torch.manual_seed(0)
    cfg = make_cfg("model.conditioning=class", "train.task=class", "model.num_classes=3",
                   "model.decoder.dropout=0.0")
    return randomize(JetFormer.from_config(cfg, vocab_size=VOCAB), std=0.05, out_std=0.2).eval()


def _loss(model, batch, image_first, seed=1, **kw):
    kw.setdefault("train", False)
    B = batch["images"].shape[0]
    first = torch.full((B,), image_first, dtype=torch.bool)
    return model.compute_loss({**batch, "image_first": first}, 0.0,
                              generator=torch.Generator().manual_seed(seed), **kw)


# ----------------------------------------------------------------------------- loss
def test_bits_per_dim_scores_every_dimension_once(make_cfg):
    """At init the flow is the identity and the GMM head is N(0, I): the image bpd must equal
    the N(0, 1) NLL of every dequantised pixel (tokens AND factored-out dims), + log2(127.5)."""
    torch.manual_seed(0)
    model = JetFormer.from_config(make_cfg(), vocab_size=VOCAB).eval()
    batch = toy_pairs()
    out = _loss(model, batch, image_first=False, seed=3)
    x = to_model_space(batch["images"], torch.Generator().manual_seed(3))
    nll = (0.5 * x ** 2 + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)   # nats per image
    expected = nll / (x[0].numel() * math.log(2)) + math.log2(127.5)
    assert out["image_bpd"].item() == pytest.approx(expected.mean().item(), abs=1e-4)
    assert out["loss"].item() == pytest.approx(expected.mean().item(), abs=1e-4)
    assert out["logdet_per_dim"].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isnan(out["text_nll"])  # no image-first rows in this batch


def test_loss_only_on_second_modality(text_model):
    """Text-first rows never use the text head, image-first rows never use the GMM head or the
    flow (stop-gradient): their gradients are exactly zero."""
    batch = toy_pairs()
    model = text_model
    out = _loss(model, batch, image_first=False)
    out["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.text_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gmm_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.codec.parameters())
    model.zero_grad(set_to_none=True)

    out = _loss(model, batch, image_first=True)
    out["loss"].backward()
    for part in (model.gmm_head, model.codec):
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())
    assert model.text_head.weight.grad.abs().sum() > 0
    assert torch.isnan(out["image_bpd"]) and out["text_nll"] > 0


def test_prefix_targets_and_padding_do_not_change_the_loss(text_model):
    g = torch.Generator().manual_seed(0)
    batch = toy_pairs()
    text, mask = random_text(8, 8, g)
    batch.update(text=text, text_mask=mask)
    model = text_model
    for image_first in (False, True):
        base = _loss(model, batch, image_first)["loss"]
        # tokens under the padding mask are invisible
        junk = torch.where(mask, text, torch.randint(4, VOCAB, text.shape, generator=g))
        assert torch.equal(base, _loss(model, {**batch, "text": junk}, image_first)["loss"])
        # the prefix modality's own predictions are not scored: perturbing the head that
        # predicts it leaves the loss unchanged, perturbing the other head does not
        prefix_head = model.text_head if not image_first else model.gmm_head.proj
        scored_head = model.gmm_head.proj if not image_first else model.text_head
        with torch.no_grad():
            prefix_head.weight.add_(1.0)
            assert torch.equal(base, _loss(model, batch, image_first)["loss"])
            prefix_head.weight.sub_(1.0)
            scored_head.weight.mul_(1.5)
            assert not torch.equal(base, _loss(model, batch, image_first)["loss"])
            scored_head.weight.div_(1.5)


def test_loss_is_the_row_weighted_sum_of_its_two_parts(make_cfg, randomize):
    """loss = (sum of the text-first rows' image bpd + text_loss_weight x sum of the image-first
    rows' text NLL) / B: a mixed batch gives what its text-first part and its image-first part
    give alone (same random draws), each weighted by its number of rows."""
    cfg = make_cfg("model.decoder.dropout=0.0")
    torch.manual_seed(0)
    model = JetFormer(cfg.model, Objective(task="both", cfg_drop_prob=0.1, text_loss_weight=0.5),
                      resolution=8, max_text_len=8, seed=0, vocab_size=VOCAB)
    model = randomize(model, std=0.05, out_std=0.2).eval()
    batch = toy_pairs()
    batch["text"], batch["text_mask"] = random_text(8, 8, torch.Generator().manual_seed(0))
    first = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    mixed = model.compute_loss({**batch, "image_first": first}, 0.0, train=False,
                               generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)   # text-first rows draw first, then image-first rows
    alone = {}
    for kind, rows in (("t2i", ~first), ("i2t", first)):
        part = {k: v[rows] for k, v in batch.items()}
        alone[kind] = model.compute_loss({**part, "image_first": first[rows]}, 0.0, train=False,
                                         generator=g)
    n_t2i, n_i2t = int((~first).sum()), int(first.sum())
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone["t2i"]["loss"], alone["t2i"]["image_bpd"], **close)
    torch.testing.assert_close(alone["i2t"]["loss"], 0.5 * alone["i2t"]["text_nll"], **close)
    torch.testing.assert_close(mixed["image_bpd"], alone["t2i"]["image_bpd"], **close)
    torch.testing.assert_close(mixed["text_nll"], alone["i2t"]["text_nll"], **close)
    for key in ("logdet_per_dim", "prior_nll_per_dim"):
        torch.testing.assert_close(mixed[key], alone["t2i"][key], **close)
    expected = (n_t2i * alone["t2i"]["loss"] + n_i2t * alone["i2t"]["loss"]) / 8
    torch.testing.assert_close(mixed["loss"], expected, **close)
    assert 0.5 * n_i2t * mixed["text_nll"] / 8 > 100 * 1e-5 * mixed["loss"]  # the text counts


def test_model_takes_its_own_settings(make_cfg):
    """The model reads `cfg.model` plus its Objective (built from `cfg.train` in one place);
    `from_config` equals the explicit constructor, and the settings are checked."""
    cfg = make_cfg("train.task=i2t", "train.text_loss_weight=0.5", "train.cfg_drop_prob=0.2")
    torch.manual_seed(0)
    a = JetFormer.from_config(cfg, vocab_size=VOCAB)
    assert a.objective == Objective(task="i2t", cfg_drop_prob=0.2, text_loss_weight=0.5)
    assert (a.max_text_len, a.codec.resolution) == (8, 8)
    states = []
    for seed in (cfg.seed, cfg.seed + 1):
        torch.manual_seed(0)
        states.append(JetFormer(cfg.model, a.objective, resolution=8, max_text_len=8, seed=seed,
                                vocab_size=VOCAB).state_dict())
    assert all(torch.equal(v, states[0][k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, states[1][k]) for k, v in states[0].items())  # seed -> flow
    out = a.compute_loss(toy_pairs(), 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(out["image_bpd"]) and out["loss"] == 0.5 * out["text_nll"]  # all i2t
    with pytest.raises(ValueError, match="train.task"):
        Objective(task="x2y", cfg_drop_prob=0.1, text_loss_weight=1.0)
    with pytest.raises(ValueError, match="train.task='class'"):
        JetFormer(cfg.model, Objective(task="class", cfg_drop_prob=0.1, text_loss_weight=1.0),
                  resolution=8, max_text_len=8, seed=0, vocab_size=VOCAB)


def test_text_loss_mask_selects_scored_tokens(text_model):
    """VQA-style: only answer tokens are scored. The last valid token is only ever a target, so
    when it is masked out of the loss, changing it changes nothing."""
    batch = toy_pairs()
    loss_mask = torch.zeros_like(batch["text_mask"])
    loss_mask[:, 1] = True                                    # score only the second token
    base = _loss(text_model, {**batch, "text_loss_mask": loss_mask}, True)
    changed = batch["text"].clone()
    changed[:, 2] = 5                                         # the EOS target, not scored
    same = _loss(text_model, {**batch, "text": changed, "text_loss_mask": loss_mask}, True)
    assert torch.equal(base["loss"], same["loss"])
    full = _loss(text_model, {**batch, "text": changed}, True)
    assert not torch.equal(base["loss"], full["loss"])


def test_training_noise_only_on_text_first_rows(text_model, make_cfg):
    """RGB curriculum noise, latent noise and condition dropout only touch rows whose image is
    scored; image-first rows get the same loss with or without them."""
    batch = toy_pairs()
    clean = _loss(text_model, batch, True, train=False)["loss"]
    noisy = text_model.compute_loss({**batch, "image_first": torch.ones(8, dtype=torch.bool)},
                                    sigma_rgb=40.0, train=True,
                                    generator=torch.Generator().manual_seed(1))["loss"]
    assert torch.equal(clean, noisy)
    # on text-first rows both noises reach the scored tokens: at init (identity flow, N(0, I)
    # head) extra variance in the tokens raises the N(0, I) NLL
    tf = {**batch, "image_first": torch.zeros(8, dtype=torch.bool)}
    for latent in (0.0, 2.0):
        torch.manual_seed(0)
        cfg = make_cfg(f"model.latent_noise_max={latent}")
        model = JetFormer.from_config(cfg, vocab_size=VOCAB)
        losses = [model.compute_loss(tf, sigma, train=True,
                                     generator=torch.Generator().manual_seed(1))["image_bpd"]
                  for sigma in (0.0, 40.0)]
        assert losses[1] > losses[0] + 0.03
        if latent == 0.0:
            no_latent = losses[0]
    assert losses[0] > no_latent + 0.1


def test_condition_changes_image_likelihood(text_model, class_model):
    batch = toy_pairs()
    g = torch.Generator().manual_seed(0)
    nll_a = text_model.image_bits_per_dim(batch["images"], g, batch["text"], batch["text_mask"])
    nll_b = text_model.image_bits_per_dim(batch["images"], torch.Generator().manual_seed(0),
                                          batch["text"].roll(1, 0), batch["text_mask"].roll(1, 0))
    assert not torch.allclose(nll_a, nll_b)
    # the same number through compute_loss (eval, text-first) and image_bits_per_dim
    loss = _loss(text_model, batch, False, seed=0)
    assert loss["image_bpd"].item() == pytest.approx(nll_a.mean().item(), abs=1e-5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cb = {"images": batch["images"], "labels": labels}
    a = class_model.compute_loss(cb, 0.0, train=False, generator=torch.Generator().manual_seed(0))
    b = class_model.compute_loss({**cb, "labels": (labels + 1) % 3}, 0.0, train=False,
                                 generator=torch.Generator().manual_seed(0))
    assert a["image_bpd"] != b["image_bpd"] and torch.isnan(a["text_nll"])


def test_overfits_fixed_batch(make_cfg):
    """A tiny model memorises 8 image-caption pairs (both orders): image bpd and text NLL fall."""
    torch.manual_seed(0)
    cfg = make_cfg("model.decoder.dropout=0.0", "train.task=both")
    model = JetFormer.from_config(cfg, vocab_size=VOCAB)
    batch = toy_pairs()

    def evaluate():
        with eval_mode(model), torch.no_grad():
            return (_loss(model, batch, False)["image_bpd"].item(),
                    _loss(model, batch, True)["text_nll"].item())

    bpd0, text0 = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = model.compute_loss(batch, 0.0, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    bpd1, text1 = evaluate()
    assert bpd1 < bpd0 - 2.0, (bpd0, bpd1)
    assert text1 < 0.5 * text0, (text0, text1)


def test_flow_prior_loss_is_bits_per_dim(make_cfg):
    """Identity flow at init: the flow-alone loss is the N(0, I) bpd of the dequantised pixels."""
    torch.manual_seed(0)
    model = JetFormer.from_config(make_cfg(), vocab_size=VOCAB)
    images = toy_pairs()["images"]
    loss = model.flow_prior_loss(images, 0.0, generator=torch.Generator().manual_seed(2))
    x = to_model_space(images, torch.Generator().manual_seed(2))
    expected = ((0.5 * x ** 2 + 0.5 * math.log(2 * math.pi)).mean() / math.log(2)
                + math.log2(127.5))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    loss.backward()
    assert all(p.grad is None for p in model.decoder.parameters())


# ----------------------------------------------------------------------------- sampling
def test_kv_cache_sampling_equals_recompute(text_model, class_model):
    g = torch.Generator().manual_seed(0)
    text, mask = random_text(3, 8, g)  # different lengths: padding inside the prefix
    for cfg_scale in (0.0, 2.0):
        a = text_model.sample_images(text, mask, cfg_scale=cfg_scale, temperature=0.9,
                                     generator=torch.Generator().manual_seed(5))
        b = text_model.sample_images(text, mask, cfg_scale=cfg_scale, temperature=0.9,
                                     generator=torch.Generator().manual_seed(5), use_cache=False)
        assert a.dtype == torch.uint8 and a.shape == (3, 8, 8, 3)
        assert torch.equal(a, b)
    labels = torch.tensor([0, 2])
    a = class_model.sample_images(labels=labels, cfg_scale=3.0,
                                  generator=torch.Generator().manual_seed(5))
    b = class_model.sample_images(labels=labels, cfg_scale=3.0, use_cache=False,
                                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_padded_prompt_samples_like_unpadded(text_model):
    """Key-padding mask + cumsum positions: a prompt padded to 8 tokens samples exactly like the
    same prompt given alone without padding (same generator)."""
    text = torch.tensor([[5, 6, EOS_ID, 0, 0, 0, 0, 0]])
    a = text_model._sample_tokens(text_model._text_first_prefix(
        *text_model._condition(text, text != 0, None, None)), None, 0.0, 1.0,
        torch.Generator().manual_seed(1), True)
    short = text[:, :3]
    b = text_model._sample_tokens(text_model._text_first_prefix(
        *text_model._condition(short, short != 0, None, None)), None, 0.0, 1.0,
        torch.Generator().manual_seed(1), True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cfg_scale_zero_equals_unguided(text_model, class_model):
    """The CFG batch (conditional + [NOLABEL] rows) with guidance 0 draws exactly the unguided
    samples; a positive guidance changes them."""
    for model, cond in ((text_model, dict(text=toy_pairs(4)["text"])),
                        (class_model, dict(labels=torch.tensor([0, 1, 2, 1])))):
        cond_h, cond_valid = model._condition(cond.get("text"), None, cond.get("labels"), None)
        prefix = model._text_first_prefix(cond_h, cond_valid)
        uncond = model._text_first_prefix(*model._unconditional(4, cond_h.shape[1]))
        guided0 = model._sample_tokens(prefix, uncond, 0.0, 1.0,
                                       torch.Generator().manual_seed(7), True)
        unguided = model._sample_tokens(prefix, None, 0.0, 1.0,
                                        torch.Generator().manual_seed(7), True)
        assert torch.equal(guided0, unguided)
        images0 = model.sample_images(**cond, cfg_scale=0.0,
                                      generator=torch.Generator().manual_seed(7))
        images3 = model.sample_images(**cond, cfg_scale=3.0,
                                      generator=torch.Generator().manual_seed(7))
        assert not torch.equal(images0, images3)


def test_generate_text_cache_equals_full_forward(text_model):
    images = toy_pairs(4)["images"]
    prefix = torch.tensor([[5, 6, 0], [7, 0, 0], [8, 9, 10], [11, 0, 0]])
    for kw in ({}, {"prefix": prefix, "prefix_mask": prefix != 0}):
        a = text_model.generate_text(images, max_len=6, **kw)
        b = text_model.generate_text(images, max_len=6, use_cache=False, **kw)
        assert a.shape[0] == 4 and 1 <= a.shape[1] <= 6
        assert torch.equal(a, b)
    # a right-padded prefix decodes exactly like the same prefix alone without padding
    for row in range(4):
        n = int((prefix[row] != 0).sum())
        alone = text_model.generate_text(images[row:row + 1], prefix=prefix[row:row + 1, :n],
                                         max_len=6)
        padded = text_model.generate_text(images[row:row + 1], prefix=prefix[row:row + 1],
                                          prefix_mask=prefix[row:row + 1] != 0, max_len=6)
        assert torch.equal(alone, padded), row
    # greedy: each generated token is the argmax of log p(. | image, previous tokens)
    out = text_model.generate_text(images, max_len=4)
    for t in range(out.shape[1]):
        best = None
        for cand in range(4, VOCAB):
            trial = torch.cat([out[:, :t], torch.full((4, 1), cand)], dim=1)
            score = text_model.score_text(images, trial, torch.ones_like(trial, dtype=torch.bool))
            best = score[:, None] if best is None else torch.cat([best, score[:, None]], 1)
        # only rows whose greedy token is an ordinary id (not EOS / special) are compared
        rows = out[:, t] >= 4
        assert torch.equal(best.argmax(1)[rows] + 4, out[rows, t])


def test_zero_shot_scoring_picks_the_trained_caption(make_cfg):
    """Train a few image->text steps on two classes (red / blue images, captions [4] / [5]);
    scoring both class names on fresh images of each class picks the right one, and greedy
    decoding stops at EOS."""
    torch.manual_seed(0)
    cfg = make_cfg("model.decoder.dropout=0.0", "train.task=i2t")
    model = JetFormer.from_config(cfg, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(0)

    def draw(B):
        label = torch.arange(B) % 2
        base = PALETTE[label * 2]                                     # red or blue
        images = (base[:, None, None, :].float()
                  + 30 * torch.randn(B, 8, 8, 3, generator=g)).clamp(0, 255).to(torch.uint8)
        text = torch.zeros(B, 8, dtype=torch.long)
        text[:, 0], text[:, 1] = 4 + label, EOS_ID
        return images, text, label

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        images, text, _ = draw(8)
        loss = model.compute_loss({"images": images, "text": text, "text_mask": text != 0},
                                  0.0, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, _, label = draw(6)
    names = torch.tensor([[4, EOS_ID], [5, EOS_ID]])
    scores = torch.stack([model.score_text(images, n.expand(6, 2),
                                           torch.ones(6, 2, dtype=torch.bool))
                          for n in names], dim=1)                     # [B, classes]
    assert (scores <= 0).all()
    assert torch.equal(scores.argmax(1), label)
    # greedy captioning says the class name, then EOS, and stops there (all rows finished)
    captions = model.generate_text(images, max_len=6)
    assert torch.equal(captions, torch.stack([4 + label, torch.full((6,), EOS_ID)], dim=1))


# ----------------------------------------------------------------------------- EMA
def test_ema_tracks_average_and_swaps_back(make_cfg):
    torch.manual_seed(0)
    model = JetFormer.from_config(make_cfg(), vocab_size=VOCAB)
    ema = EMA(model, decay=0.9)
    w0 = model.image_embed.weight.detach().clone()
    with torch.no_grad():
        model.image_embed.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * w0 + 0.1 * (w0 + 1.0)
    torch.testing.assert_close(ema.shadow["image_embed.weight"], expected)
    with ema.averaged(model):
        torch.testing.assert_close(model.image_embed.weight, expected)
    torch.testing.assert_close(model.image_embed.weight, w0 + 1.0)
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 1
    torch.testing.assert_close(other.shadow["image_embed.weight"], expected)
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_bad_inputs_fail_clearly(text_model, class_model, make_cfg):
    batch = toy_pairs()
    with pytest.raises(ValueError, match="images"):
        text_model.compute_loss({**batch, "images": batch["images"].float()}, 0.0)
    with pytest.raises(ValueError, match="text"):
        text_model.compute_loss({"images": batch["images"]}, 0.0)
    with pytest.raises(ValueError, match="labels"):
        class_model.compute_loss({"images": batch["images"], "labels": torch.full((8,), 3)}, 0.0)
    with pytest.raises(ValueError, match="text_loss_mask"):
        text_model.compute_loss({**batch, "text_loss_mask": batch["text_mask"][:, :4]}, 0.0)
    with pytest.raises(ValueError, match="image_first"):
        text_model.compute_loss({**batch, "image_first": torch.ones(3, dtype=torch.bool)}, 0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        JetFormer.from_config(make_cfg(), vocab_size=3)
