"""Inspection tools (jetformer/inspect): per-patch likelihood maps, latent manipulations,
completion, the text -> image -> text round trip, and their CLI commands."""
import math

import pytest
import torch
from conftest import make_tiny_cfg, randomize_
from PIL import Image

from jetformer.cli import main
from jetformer.data.tokenizer import train_tokenizer
from jetformer.inspect.complete import complete
from jetformer.inspect.latents import decode_latents, encode_image, prior_rest
from jetformer.inspect.likelihood import patch_nll
from jetformer.inspect.manipulate import manipulations, swap_neighbours
from jetformer.inspect.roundtrip import names_attribute, roundtrip_scores
from jetformer.models.jetformer import JetFormer
from jetformer.noise import PIXEL_SCALE
from jetformer.train.checkpoint import export_model

FACTORINGS = [("post_flow",), ("learnable_w",), ("none", "model.factored_dims=12"),
              ("no_flow", "model.factored_dims=12")]
TEXTS = ["a red circle", "a blue square on the left", "a green triangle in the center", "red",
         "blue", "a small yellow circle", "two shapes"] * 4


def _model(*overrides, vocab=32, seed=0):
    cfg = make_tiny_cfg(*overrides)
    torch.manual_seed(seed)
    return randomize_(JetFormer.from_config(cfg, vocab_size=vocab), seed=seed).eval()


def _images(n=3, seed=0):
    return torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- likelihood maps
@pytest.mark.parametrize("factoring", FACTORINGS, ids=lambda f: f[0])
def test_patch_nll_sums_to_the_models_total(factoring):
    """Per-patch bits (GMM + factored + log-det) sum to the model's own image NLL: the eval path
    (`image_bits_per_dim`) and the training loss path (`compute_loss`, train=False), both
    dequantised with the same seed. Tolerance: 1e-5 relative (fp32 sums of 16 patches)."""
    model = _model(f"model.factoring={factoring[0]}", *factoring[1:])
    images = _images()
    p = patch_nll(model, images, torch.Generator().manual_seed(1))
    dims = model.num_image_dims
    ref = model.image_bits_per_dim(images, torch.Generator().manual_seed(1)).double() * dims
    assert torch.allclose(p.per_patch.sum(1), ref, rtol=1e-5, atol=0)
    assert torch.allclose(p.total_bits, ref, rtol=1e-5, atol=0)
    for i in range(len(images)):   # the loss path, one image per batch (loss = its bits/dim)
        loss = model.compute_loss({"images": images[i:i + 1], "text": torch.full((1, 8), 2),
                                   "image_first": torch.zeros(1, dtype=torch.bool)},
                                  sigma_rgb=0.0, train=False,
                                  generator=torch.Generator().manual_seed(10 + i))["loss"]
        q = patch_nll(model, images[i:i + 1], torch.Generator().manual_seed(10 + i),
                      text=torch.full((1, 8), 2))
        assert math.isclose(float(q.per_patch.sum()), float(loss.detach()) * dims, rel_tol=1e-5)
    # the map's mean bits/dim is the image's bits/dim; parts are finite and patch-resolved
    assert torch.allclose(p.maps("total").mean((1, 2)), p.bits_per_dim.double(), rtol=1e-5)
    assert p.maps("gmm").shape == (3, 4, 4)
    assert all(torch.isfinite(getattr(p, k)).all() for k in ("gmm", "factored", "logdet"))
    assert p.gmm.std() > 0


def test_patch_nll_parts_match_the_codec():
    """Each part's sum is the codec's own number: factored = prior_nll(rest), log-det = the
    flow's -logdet plus the [-1, 1] -> pixel units term; and only the GMM part sees the text."""
    model = _model("model.factoring=learnable_w")
    images = _images(2)
    from jetformer.noise import to_model_space
    x = to_model_space(images, torch.Generator().manual_seed(3))
    _, rest, logdet = model.codec.encode(x)
    p = patch_nll(model, images, torch.Generator().manual_seed(3))
    ln2 = math.log(2.0)
    assert torch.allclose(p.factored.sum(1), model.codec.prior_nll(rest).double() / ln2, rtol=1e-5)
    want = -logdet.double() / ln2 + model.num_image_dims * math.log2(PIXEL_SCALE)
    assert torch.allclose(p.logdet.sum(1), want, rtol=1e-5)
    # the flow's log-det depends on the patch: not spread uniformly
    assert p.logdet.std(1).min() > 1e-3
    text = torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0]] * 2)
    q = patch_nll(model, images, torch.Generator().manual_seed(3), text=text)
    assert torch.equal(q.factored, p.factored) and torch.equal(q.logdet, p.logdet)
    assert not torch.allclose(q.gmm, p.gmm)


def test_patch_nll_rejects_bad_images():
    model = _model()
    with pytest.raises(ValueError, match="uint8 images"):
        patch_nll(model, torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\]"):
        patch_nll(model, torch.zeros(1, 16, 16, 3, dtype=torch.uint8))


# ----------------------------------------------------------------------------- manipulations
@pytest.mark.parametrize("factoring", FACTORINGS, ids=lambda f: f[0])
def test_unmanipulated_cell_is_the_input(factoring):
    """With nothing manipulated, the grid's first cell (encode -> decode) is the input pixel for
    pixel, for every factoring (randomised flow, far from the identity)."""
    model = _model(f"model.factoring={factoring[0]}", *factoring[1:])
    for img in _images(4, seed=5):
        cells = manipulations(model, img, seed=0)
        assert torch.equal(cells[0][1], img)
        assert all(c.dtype == torch.uint8 and c.shape == img.shape for _, c in cells)
        assert not any(torch.equal(c, img) for _, c in cells[1:])    # each does something


def test_manipulation_cells_do_what_they_say():
    """no_flow: tokens are the raw patches, so (c) is the input with patch columns swapped and
    (d)'s error grows with the noise scale; post_flow: the cells in order, seeded draws."""
    model = _model("model.factoring=no_flow", "model.factored_dims=12")
    img = _images(1, seed=2)[0]
    cells = dict(manipulations(model, img, noise_scales=(0.02, 0.1, 0.5)))
    swapped = img.reshape(8, 2, 2, 2, 3).flip(2).reshape(8, 8, 3)   # patch column pairs
    assert torch.equal(cells["(c) neighbours' tokens swapped"], swapped)
    err = [(cells[f"(d) tokens + {s:g} N(0, I)"].float() - img.float()).abs().mean()
           for s in (0.02, 0.1, 0.5)]
    assert err[0] < err[1] < err[2]
    model = _model()
    labels = [lab for lab, _ in manipulations(model, img)]
    assert labels[:4] == ["(e) flow only: encode -> decode", "(a) factored dims = 0",
                          "(b) factored dims ~ N(0, I)", "(c) neighbours' tokens swapped"]
    a, b = manipulations(model, img, seed=1), manipulations(model, img, seed=1)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))           # seeded draws
    c = dict(manipulations(model, img, seed=2))
    assert not torch.equal(c["(b) factored dims ~ N(0, I)"], dict(a)["(b) factored dims ~ N(0, I)"])


def test_swap_neighbours_odd_width():
    t = torch.arange(6.0).view(1, 6, 1)                       # one row of 3 patches, then 3
    out = swap_neighbours(t, (2, 3)).flatten().tolist()
    assert out == [1.0, 0.0, 2.0, 4.0, 3.0, 5.0]


# ----------------------------------------------------------------------------- completion
def test_completion_keeps_tokens_and_is_deterministic():
    model = _model()
    images = _images(2, seed=7)
    text = torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0, 0]])
    a = complete(model, images, keep_rows=2, text=text, num_samples=3, cfg_scale=2.0, seed=4)
    tokens_in, _ = encode_image(model, images)
    assert a.kept_tokens == 8 and a.kept_pixel_rows == 4
    assert a.samples.shape == (2, 3, 8, 8, 3) and a.samples.dtype == torch.uint8
    assert torch.equal(a.tokens[:, :, :8], tokens_in[:, None, :8].expand(2, 3, 8, 4))
    assert torch.equal(a.input_tokens, tokens_in)
    b = complete(model, images, keep_rows=2, text=text, num_samples=3, cfg_scale=2.0, seed=4)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.tokens, b.tokens)
    c = complete(model, images, keep_rows=2, text=text, num_samples=3, cfg_scale=2.0, seed=5)
    assert not torch.equal(a.tokens[:, :, 8:], c.tokens[:, :, 8:])
    assert not torch.equal(a.tokens[:, 0, 8:], a.tokens[:, 1, 8:])    # N different samples
    d = complete(model, images, keep_rows=2, text=text.flip(0), num_samples=3, cfg_scale=2.0,
                 seed=4)
    assert not torch.equal(a.tokens[:, :, 8:], d.tokens[:, :, 8:])    # text-conditioned
    e = complete(model, images.flip(0), keep_rows=2, text=text, num_samples=3, cfg_scale=2.0,
                 seed=4)
    assert not torch.equal(a.tokens[:, :, 8:], e.tokens[:, :, 8:])    # kept rows condition
    # drift of the kept rows: measured, and explained by the flow (a randomised coupling net
    # attends to the completed patches)
    for k in ("mean_abs_px", "max_abs_px", "changed_frac"):
        assert a.drift[k].shape == (2, 3) and (a.drift[k] >= 0).all()
    kept = a.samples[:, :, :4].float() - images[:, None, :4].float()
    assert torch.allclose(a.drift["mean_abs_px"], kept.abs().flatten(2).mean(2).double())
    assert a.drift_summary()["kept_rows_mean_abs_px"] > 0


def test_completion_edge_cases_use_the_models_sampler():
    """keep_rows = 0 is the model's own sampler (same seed: the same image up to the half-pixel
    rounding convention of decoding); keep_rows = all rows returns the input, zero drift."""
    model = _model("model.conditioning=class", "model.num_classes=3", "train.task=class")
    labels = torch.tensor([0, 2])
    images = _images(2)
    out = complete(model, images, keep_rows=0, labels=labels, num_samples=1, cfg_scale=1.5,
                   temperature=0.9, seed=3)
    ref = model.sample_images(labels=labels, cfg_scale=1.5, temperature=0.9,
                              generator=torch.Generator().manual_seed(3))
    diff = (out.samples[:, 0].int() - ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.6
    full = complete(model, images, keep_rows=4, labels=labels, num_samples=2)
    assert torch.equal(full.samples, images[:, None].expand(2, 2, 8, 8, 3))
    assert full.drift_summary()["kept_rows_max_abs_px"] == 0
    with pytest.raises(ValueError, match="keep_rows=5"):
        complete(model, images, keep_rows=5, labels=labels)
    with pytest.raises(ValueError, match="needs a condition"):
        complete(model, images, keep_rows=1, cfg_scale=1.0)


def test_prior_rest_is_the_codecs_draw():
    """prior_rest returns exactly the factored dims `codec.decode(rest=None)` draws."""
    model = _model()
    tokens = torch.randn(2, 16, 4)
    r = prior_rest(model, tokens, torch.Generator().manual_seed(0))
    drawn = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r, drawn, atol=1e-4)
    x = decode_latents(model, tokens, r)
    assert x.dtype == torch.uint8


# ----------------------------------------------------------------------------- round trip
def test_roundtrip_scores():
    prompts = ["a red circle on the left", "a blue square", "a light_blue triangle"]
    asked = [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"},
             {"shape": "triangle", "color": "light_blue"}]
    same, rows = roundtrip_scores(prompts, [p.replace("_", " ") for p in prompts], asked)
    wrong, _ = roundtrip_scores(prompts, ["a green circle", "a red circle", "two shapes"], asked)
    assert same["roundtrip_attribute_recall"] == 1.0
    assert wrong["roundtrip_attribute_recall"] == pytest.approx(1 / 6)    # "circle" in row 1
    assert same["roundtrip_cider"] > wrong["roundtrip_cider"]
    assert rows[0]["named_color"] is True and rows[0]["caption"] == prompts[0]
    assert roundtrip_scores(prompts, prompts)[0]["roundtrip_attribute_recall"] is None
    assert names_attribute("A light blue circle.", "light_blue")
    assert not names_attribute("a reddish circle", "red")
    with pytest.raises(ValueError, match="3 prompts, 2 captions"):
        roundtrip_scores(prompts, prompts[:2])


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    tok = train_tokenizer(TEXTS, d / "tok.model", vocab_size=40)
    cfg = make_tiny_cfg(f"tokenizer.out_path={d / 'tok.model'}", "eval.batch_size=2")
    torch.manual_seed(0)
    model = randomize_(JetFormer.from_config(cfg, vocab_size=tok.vocab_size))
    export_model({"config": cfg.to_dict(), "vocab_size": tok.vocab_size, "num_classes": 0,
                  "pca": None, "step": 1, "model": model.state_dict(), "ema": None}, d / "ck")
    paths = []
    for i, img in enumerate(_images(3, seed=9).numpy()):  # batches of 2 and 1
        paths.append(str(d / f"img{i}.png"))
        Image.fromarray(img).save(paths[-1])
    return d, paths


def test_cli_nll_map_manipulate_complete(checkpoint, tmp_path, capsys):
    d, paths = checkpoint
    ck = str(d / "ck")
    assert main(["nll", "--checkpoint", ck, *paths, "--map", str(tmp_path / "map.png")]) == 0
    out_map = capsys.readouterr().out
    assert "bits/dim" in out_map and "gmm" in out_map and "map.png" in out_map
    assert Image.open(tmp_path / "map.png").size[0] > 100
    assert main(["manipulate", "--checkpoint", ck, paths[0], "--out",
                 str(tmp_path / "man.png")]) == 0
    assert "(e) flow only" in capsys.readouterr().out
    assert (tmp_path / "man.png").is_file()
    assert main(["complete", "--checkpoint", ck, paths[0], "--keep-rows", "2", "--prompt",
                 "a red circle", "--cfg", "1.5", "--num", "2", "--out",
                 str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "kept rows drift" in out and (tmp_path / "c.png").is_file()
    assert main(["complete", "--checkpoint", ck, paths[0], "--keep-rows", "9"]) == 1
    assert "keep_rows=9" in capsys.readouterr().err
    assert main(["manipulate", "--checkpoint", ck, str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err
    # the plain `nll` command is unchanged without --map
    assert main(["nll", "--checkpoint", ck, *paths]) == 0
    plain = capsys.readouterr().out
    assert "gmm" not in plain
    # and --map reports the very same bits/dim (same dequantisation stream)
    bpd = lambda text: [line.split("\t")[1] for line in text.splitlines() if "\t" in line]
    assert bpd(plain) == bpd(out_map)


# ----------------------------------------------------------------------------- DVC stage
def test_inspect_stage_writes_grids_and_metrics(tmp_path):
    """run_inspect on a tiny exported model and a prepared synthetic world: the grids, the
    metrics (round trip of real samples captioned by a real captioner) and the skip path."""
    import json

    from jetformer.data.prepare import prepare
    from jetformer.eval.report import write_json
    from jetformer.eval.sampling import sample_from_text
    from jetformer.inspect.stage import run_inspect
    from jetformer.train.checkpoint import atomic_torch_save

    cfg = make_tiny_cfg(f"data.synthetic.out_dir={tmp_path / 'raw'}",
                        f"data.prepared_dir={tmp_path / 'prepared'}", "data.synthetic.num_train=24",
                        "data.synthetic.num_val=5", "data.synthetic.bad_files=false",
                        "data.workers=1", f"train.out_dir={tmp_path / 'ck'}",
                        f"tokenizer.out_path={tmp_path / 'tok.model'}", "eval.batch_size=4",
                        "eval.max_decode_len=6", "eval.cfg_scale=1.0")
    prepare(cfg)
    tok = train_tokenizer(TEXTS, tmp_path / "tok.model", vocab_size=40)
    torch.manual_seed(0)
    model = randomize_(JetFormer.from_config(cfg, vocab_size=tok.vocab_size)).eval()
    state = {"config": cfg.to_dict(), "vocab_size": tok.vocab_size, "num_classes": 0,
             "pca": None, "step": 1, "model": model.state_dict(), "ema": None}
    export_model(state, tmp_path / "ck")
    export_model(state, tmp_path / "cap")
    write_json(tmp_path / "cap" / "finetune.json", {"task": "caption", "skipped": ""})
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = sample_from_text(model, tok, prompts, max_text_len=8, cfg_scale=0.0,
                              temperature=1.0, batch_size=4)
    atomic_torch_save({"images": images, "prompts": prompts, "ids": [0, 1, 2], "attributes": [
        {"objects": [{"shape": s, "color": c}]} for c, s in (p.split()[1:] for p in prompts)]},
        tmp_path / "samples" / "t2i.pt")
    paths = {"plots": tmp_path / "plots" / "inspect", "metrics": tmp_path / "m.json",
             "samples": tmp_path / "samples", "captioner": tmp_path / "cap",
             "table": tmp_path / "plots" / "rt.csv"}
    result = run_inspect(cfg, **paths)
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(result))
    for name in ("likelihood", "manipulations", "completion", "roundtrip"):
        assert (paths["plots"] / f"{name}.png").stat().st_size > 1000
    assert result["inspect_flow_roundtrip_exact"] is True
    assert result["inspect_num_images"] == 4 and result["completion_keep_rows"] == 2
    parts = sum(result[f"inspect_{k}_bits_per_dim"] for k in ("gmm", "factored", "logdet"))
    assert math.isclose(parts, result["inspect_total_bits_per_dim"], rel_tol=1e-6)
    assert result["roundtrip_num"] == 3 and 0 <= result["roundtrip_attribute_recall"] <= 1
    assert len((tmp_path / "plots" / "rt.csv").read_text().splitlines()) == 4
    # no captioner: the round trip is skipped with the reason, the table removed
    write_json(tmp_path / "cap" / "finetune.json", {"task": "caption",
                                                    "skipped": "class-conditional model"})
    result = run_inspect(cfg, **paths)
    assert result["roundtrip_cider"] is None and "class-conditional" in result["roundtrip_skipped"]
    assert not (tmp_path / "plots" / "rt.csv").exists()
