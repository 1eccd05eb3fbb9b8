"""The `sample` / `caption` / `answer` / `nll` commands on a tiny exported checkpoint."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_cfg
from jetformer.cli import main
from jetformer.data.tokenizer import train_tokenizer
from jetformer.eval.finetune import generate_answers
from jetformer.eval.sampling import make_grid
from jetformer.models.jetformer import JetFormer
from jetformer.train.checkpoint import export_model, load_trained

TEXTS = ["a red circle", "a blue square on the left", "what color is the large circle?", "red",
         "blue", "how many shapes are there?", "2", "a green triangle in the center", "yes",
         "no"] * 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    tok = train_tokenizer(TEXTS, d / "tok.model", vocab_size=48)
    cfg = make_tiny_cfg(f"tokenizer.out_path={d / 'tok.model'}", "eval.batch_size=3")
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=tok.vocab_size)
    with torch.no_grad():   # a non-trivial GMM head so samples depend on the random stream
        for p in model.gmm_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_model({"config": cfg.to_dict(), "vocab_size": tok.vocab_size, "num_classes": 0,
                  "pca": None, "step": 1, "model": model.state_dict(), "ema": None}, d / "ck")
    return d


def _write_image(path, size=(12, 10), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_sample_command_cfg0_equals_unguided(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(checkpoint / "ck"), "--prompt", "a red circle",
                 "--prompt", "a blue square", "--num", "2", "--cfg", "0", "--temperature",
                 "0.9", "--seed", "7", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    model, cfg = load_trained(checkpoint / "ck", device="cpu")
    from jetformer.data.tokenizer import TextTokenizer
    tok = TextTokenizer(checkpoint / "tok.model")
    text, mask = tok.encode_batch(["a red circle"] * 2 + ["a blue square"] * 2,
                                  cfg.tokenizer.max_text_len)
    # eval.batch_size=3: the command samples in batches of 3 and 1 from one seeded stream
    g = torch.Generator().manual_seed(7)
    ref = torch.cat([
        model.sample_images(text[:3], mask[:3], cfg_scale=0.0, temperature=0.9, generator=g),
        model.sample_images(text[3:], mask[3:], cfg_scale=0.0, temperature=0.9, generator=g)])
    scale = max(1, 128 // ref.shape[1])
    assert np.array_equal(grid, make_grid(ref, nrow=2, scale=scale))
    # guidance changes the draw (the CFG path is really taken when cfg > 0)
    out2 = tmp_path / "grid_cfg.png"
    assert main(["sample", "--checkpoint", str(checkpoint / "ck"), "--prompt", "a red circle",
                 "--prompt", "a blue square", "--num", "2", "--cfg", "3", "--temperature",
                 "0.9", "--seed", "7", "--out", str(out2)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out2)), grid)


def test_caption_answer_nll_commands(checkpoint, tmp_path, capsys):
    a = _write_image(tmp_path / "a.png")
    b = _write_image(tmp_path / "b.jpg", size=(30, 17), color=(20, 40, 200))
    ck = str(checkpoint / "ck")
    assert main(["caption", "--checkpoint", ck, a, b]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [a, b]
    assert main(["answer", "--checkpoint", ck, a, "what color is the large circle?"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert main(["nll", "--checkpoint", ck, a, b]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    bpd = [float(ln.split("\t")[1].split()[0]) for ln in lines]
    assert len(bpd) == 2 and all(0 < x < 64 for x in bpd)


def test_bad_paths_and_unreadable_images_give_clear_errors(checkpoint, tmp_path, capsys):
    ck = str(checkpoint / "ck")
    good = _write_image(tmp_path / "ok.png")
    missing = str(tmp_path / "nope.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for argv, needle in [
            (["caption", "--checkpoint", ck, good, missing], f"image not found: {missing}"),
            (["nll", "--checkpoint", ck, str(garbage)], f"cannot read image {garbage}"),
            (["answer", "--checkpoint", ck, str(empty), "what?"], f"cannot read image {empty}"),
            (["caption", "--checkpoint", ck, str(tmp_path)], "not an image file"),
            (["caption", "--checkpoint", str(tmp_path / "no_ck"), good], "checkpoint not found"),
            (["sample", "--checkpoint", ck, "--label", "1"], "class-conditional checkpoint"),
            (["sample", "--checkpoint", ck], "give --prompt")]:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err, (argv, err)


def test_batched_answers_equal_one_by_one(checkpoint, randomize):
    """Questions of different lengths share a padded prefix batch: same answers as alone."""
    from jetformer.data.tokenizer import TextTokenizer
    model, cfg = load_trained(checkpoint / "ck", device="cpu")
    randomize(model, std=0.5, seed=1)      # answers that depend on the question and the image
    tok = TextTokenizer(checkpoint / "tok.model")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 8, 8, 3), generator=g, dtype=torch.uint8)
    qs = ["red", "how many shapes are there?", "what color is the large circle?"]
    batched = generate_answers(model, tok, images, qs, max_text_len=32, max_len=6, batch_size=3)
    # one by one: no padding at all
    alone = [tok.decode(model.generate_text(images[i:i + 1],
                                            prefix=torch.tensor([tok.encode(q, eos=False)]),
                                            max_len=6)[0]) for i, q in enumerate(qs)]
    assert batched == alone
    assert len(set(alone)) > 1
