"""The domain judge and FID / precision / recall / KID through torch-fidelity (no network)."""
import pytest
import torch

from jetformer.eval.fidelity import fidelity_metrics, inception_weights_path, resolve_extractor
from jetformer.eval.judge import (Judge, judge_accuracy, load_judge, save_judge, scene_targets,
                                  train_judge)

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def draw_scenes(n, shapes, colors, size=16, seed=0):
    """Filled squares / discs of a colour at random positions on a dark noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = [], []
    for i in range(n):
        shape, color = shapes[i % len(shapes)], colors[(i // len(shapes)) % len(colors)]
        img = torch.randint(0, 40, (size, size, 3), generator=g).float()
        cy, cx = torch.randint(5, size - 5, (2,), generator=g).tolist()
        mask = ((yy - cy).abs() <= 3) & ((xx - cx).abs() <= 3) if shape == "square" else \
            (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
        img[mask] = torch.tensor(COLORS[color], dtype=torch.float)
        images.append(img.to(torch.uint8))
        targets.append(scene_targets({"label": 0, "attributes": {
            "objects": [{"shape": shape, "color": color, "size": "small", "position": "center"}],
            "count": 1, "background": "plain"}}))
    return torch.stack(images), targets


def test_scene_targets_fall_back_to_label():
    assert scene_targets({"label": 3, "attributes": {}}) == {"label": "3"}


def test_judge_learns_attributes_and_round_trips(tmp_path):
    torch.manual_seed(0)
    train_x, train_y = draw_scenes(256, ["square", "disc"], ["red", "blue"], seed=0)
    judge = train_judge(train_x, train_y, steps=60, batch_size=32, lr=3e-3, width=8, feature_dim=16,
                        log=None)
    val_x, val_y = draw_scenes(64, ["square", "disc"], ["red", "blue"], seed=1)
    acc = judge_accuracy(judge, val_x, val_y)
    assert acc["color"] == 1.0
    assert acc["shape"] > 0.9
    path = tmp_path / "judge.pt"
    save_judge(judge, path)
    again = load_judge(path)
    assert torch.equal(again.features(val_x), judge.features(val_x))
    with pytest.raises(FileNotFoundError, match="judge"):
        load_judge(tmp_path / "missing.pt")


def test_domain_fid_self_zero_and_different_sets_positive(tmp_path):
    torch.manual_seed(0)
    x, y = draw_scenes(96, ["square", "disc"], ["red", "blue"], seed=2)
    path = tmp_path / "judge.pt"
    # randomly initialised judge: enough for these properties
    save_judge(Judge({"shape": ["disc", "square"], "color": ["blue", "red"]}, resolution=16,
                     width=8, feature_dim=16), path)
    same = fidelity_metrics(x, x, extractor="domain", judge_path=str(path), device="cpu",
                            kid_subsets=10)
    assert abs(same["fid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    reds, _ = draw_scenes(96, ["square"], ["red"], seed=3)
    blues, _ = draw_scenes(96, ["disc"], ["blue"], seed=4)
    diff = fidelity_metrics(reds, blues, extractor="domain", judge_path=str(path), device="cpu",
                            kid_subsets=10)
    assert diff["fid"] > 1e-2
    # KID draws its subsets independently per set (unbiased MMD): ~0 for a set against itself
    assert diff["kid"] > 10 * abs(same["kid"])
    assert diff["precision"] < 0.5 and diff["recall"] < 0.5


def test_extractor_choice_and_missing_weights(tmp_path):
    assert resolve_extractor("auto", "synthetic") == "domain"
    assert resolve_extractor("auto", "imagefolder") == "inception"
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        inception_weights_path(str(tmp_path / "nope.pth"))
    x = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match="judge weights not found"):
        fidelity_metrics(x, x, extractor="domain", judge_path=str(tmp_path / "nope.pt"))


def test_real_features_are_cached_per_data_and_judge(tmp_path, monkeypatch):
    from jetformer.eval.fidelity import real_cache_name
    from jetformer.eval.judge import JUDGE_EXTRACTOR
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    real, _ = draw_scenes(32, ["square", "disc"], ["red", "blue"], seed=5)
    fake, _ = draw_scenes(32, ["disc"], ["red"], seed=6)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"judge{seed}.pt")
        save_judge(Judge({"shape": ["disc", "square"], "color": ["blue", "red"]}, resolution=16,
                         width=8, feature_dim=16), paths[-1])
    kw = dict(extractor="domain", device="cpu", kid_subsets=10)
    first = fidelity_metrics(fake, real, judge_path=str(paths[0]), **kw)
    cache = tmp_path / "torch/fidelity_cache"
    cached = sorted(p.name for p in cache.iterdir())
    name = real_cache_name(real, JUDGE_EXTRACTOR, str(paths[0]))
    assert cached and all(n.startswith(name) for n in cached), cached   # only the real set
    assert fidelity_metrics(fake, real, judge_path=str(paths[0]), **kw) == first     # reused
    assert sorted(p.name for p in cache.iterdir()) == cached
    fidelity_metrics(fake, real, judge_path=str(paths[1]), **kw)          # another judge
    assert len(list(cache.iterdir())) == 2 * len(cached)
    other = real.clone()
    other[0, 0, 0] ^= 1                                                   # other data
    assert real_cache_name(other, JUDGE_EXTRACTOR, str(paths[0])) != name
