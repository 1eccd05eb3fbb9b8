"""Sources per role: config validation, `auto` resolution, class-name files, `prepare@<role>`
outputs (own data, pointer to the pretraining data, unavailable), and the evaluation pieces
that must not assume the shapes world (judge, feature extractor, Inception FID)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetformer.config import ROLES, ConfigError, load_config, role_prepared_dir, role_source
from jetformer.data.classnames import ClassNameError, read_class_names
from jetformer.data.roles import read_role, role_data_dir

REPO = Path(__file__).resolve().parent.parent
FIX = Path(__file__).parent / "fixtures"
CLASS_MODEL = ("model.conditioning=class", "train.task=class")


def _paths(*sources: str, class_names: bool = True) -> list[str]:
    out = []
    for s in ("train", "val"):
        if "coco" in sources:
            out += [f"data.coco.{s}_images={FIX}/coco/{s}2014",
                    f"data.coco.{s}_annotations={FIX}/coco/annotations/captions_{s}2014.json"]
        if "vqav2" in sources:
            out += [f"data.vqav2.{s}_images={FIX}/coco/{s}2014",
                    f"data.vqav2.{s}_questions="
                    f"{FIX}/vqav2/v2_OpenEnded_mscoco_{s}2014_questions.json",
                    f"data.vqav2.{s}_annotations={FIX}/vqav2/v2_mscoco_{s}2014_annotations.json"]
        if "imagefolder" in sources:
            out.append(f"data.imagefolder.{s}_images={FIX}/imagefolder/{s}")
    if "imagefolder" in sources and class_names:
        out.append(f"data.imagefolder.class_names={FIX}/imagefolder/LOC_synset_mapping.txt")
    return out


def _cfg(*overrides):
    return load_config(REPO / "params.yaml", overrides=overrides)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, key", [
    (("data.source=vqav2", *_paths("vqav2")), "data.source"),
    (("data.source=vqav2", *CLASS_MODEL, *_paths("vqav2")), "data.source"),
    (("data.source=imagefolder", *_paths("imagefolder")), "data.source"),      # text model
    (("data.source=coco", *CLASS_MODEL, *_paths("coco")), "data.source"),      # no labels
    (("data.roles.zeroshot.source=imagefolder", *_paths("imagefolder", class_names=False)),
     "data.imagefolder.class_names"),
    (("data.roles.caption.source=vqav2",), "data.roles.caption.source"),
    (("data.roles.fid.source=none",), "data.roles.fid.source"),
    (("data.roles.vqa.prepared_dir=data/prepared/pretrain",), "data.roles.vqa.prepared_dir"),
    (("data.roles.fid.source=coco", *CLASS_MODEL, *_paths("coco")), "data.roles.fid.source"),
])
def test_impossible_role_combinations_fail_at_config_load_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"key '{key}'"):
        _cfg(*overrides)


def test_vqav2_text_pretraining_fails_before_ray_starts(tmp_path):
    import yaml
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = "vqav2"
    params.write_text(yaml.safe_dump(raw))
    code = ("import runpy, sys; sys.argv = ['train.py', '--params', sys.argv[1]]\n"
            "try:\n    runpy.run_path('pipelines/train.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('rc', e.code, 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(params)], cwd=REPO, text=True,
                         capture_output=True, timeout=300, env={"PYTHONPATH": str(REPO),
                                                                "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "rc 1 False", out.stdout + out.stderr
    assert "train failed" in out.stderr and "key 'data.source' = 'vqav2'" in out.stderr
    assert "data.roles.vqa.source=vqav2" in out.stderr                      # says what to do


def test_auto_role_sources():
    shapes = _cfg()
    assert {r: role_source(shapes.data, r) for r in ROLES} == dict.fromkeys(ROLES, "synthetic")
    real = _cfg("data.source=coco", *_paths("coco", "vqav2", "imagefolder"))
    assert {r: role_source(real.data, r) for r in ROLES} == {
        "pretrain": "coco", "caption": "coco", "vqa": "vqav2", "zeroshot": "imagefolder",
        "fid": "coco"}
    coco_only = _cfg("data.source=coco", *_paths("coco"))
    assert [role_source(coco_only.data, r) for r in ("vqa", "zeroshot")] == ["none", "none"]
    imagenet = _cfg("data.source=imagefolder", *CLASS_MODEL, *_paths("imagefolder"))
    assert [role_source(imagenet.data, r) for r in ("caption", "fid")] == ["none", "imagefolder"]
    assert role_prepared_dir(imagenet.data, "vqa") == "data/prepared/vqa"


# ----------------------------------------------------------------------------- class names
def test_class_names_formats(tmp_path):
    classes = ["n01443537", "n01530575"]
    assert read_class_names(FIX / "imagefolder/LOC_synset_mapping.txt", classes) == [
        "goldfish", "brambling"]
    (tmp_path / "names.txt").write_text("great_white shark\nbrambling bird\n")   # one a line
    assert read_class_names(tmp_path / "names.txt", classes) == ["great white shark",
                                                                  "brambling bird"]
    (tmp_path / "index.json").write_text(json.dumps({"0": ["n01443537", "goldfish"],
                                                     "1": ["n01530575", "brambling"]}))
    assert read_class_names(tmp_path / "index.json", classes) == ["goldfish", "brambling"]
    (tmp_path / "map.json").write_text(json.dumps({"n01443537": "a", "n01530575": "b"}))
    assert read_class_names(tmp_path / "map.json", classes) == ["a", "b"]
    (tmp_path / "short.txt").write_text("n01443537 goldfish\nn09999999 other\nn08888888 x\n")
    with pytest.raises(ClassNameError, match="3 lines for 2 classes"):
        read_class_names(tmp_path / "short.txt", classes)
    (tmp_path / "partial.json").write_text(json.dumps({"n01443537": "goldfish"}))
    with pytest.raises(ClassNameError, match=r"no name for 1 of 2 classes.*n01530575"):
        read_class_names(tmp_path / "partial.json", classes)
    with pytest.raises(ClassNameError, match="file not found"):
        read_class_names(tmp_path / "nope.txt", classes)


# ----------------------------------------------------------------------------- prepare@<role>
def _role_dirs(root: Path) -> list[str]:
    return [f"data.prepared_dir={root / 'pretrain'}"] + [
        f"data.roles.{r}.prepared_dir={root / r}" for r in ROLES[1:]]


def test_prepare_roles_real_sources(tmp_path):
    from jetformer.data.dataset import ArrowImageDataset
    from jetformer.data.stages import run_prepare

    cfg = _cfg("data.source=coco", "data.resolution=8", "data.min_image_side=8", "data.workers=1",
               "data.roles.caption.source=none", *_paths("coco", "vqav2", "imagefolder"),
               *_role_dirs(tmp_path / "prepared"))
    metrics = {r: run_prepare(cfg, r, metrics=tmp_path / "m" / f"{r}.json") for r in ROLES}
    assert metrics["pretrain"]["train"]["written"] == 2 and metrics["vqa"]["source"] == "vqav2"
    info = {r: read_role(tmp_path / "prepared" / r) for r in ROLES}
    # own data
    assert role_data_dir(tmp_path / "prepared" / "vqa") == tmp_path / "prepared" / "vqa"
    vqa = ArrowImageDataset(role_data_dir(tmp_path / "prepared" / "vqa"), "val")
    assert sorted(len(vqa[i]["qa"]) for i in range(len(vqa))) == [1, 1]
    assert info["zeroshot"]["class_names"] == ["goldfish", "brambling"]
    # the FID reference set is the pretraining source: a pointer, not a second copy
    assert role_data_dir(tmp_path / "prepared" / "fid") == tmp_path / "prepared" / "pretrain"
    assert not list((tmp_path / "prepared" / "fid").glob("*/*.arrow"))
    # a role without a source says why
    assert role_data_dir(tmp_path / "prepared" / "caption") is None
    assert "data.roles.caption.source is 'none'" in info["caption"]["unavailable"]
    assert json.loads((tmp_path / "m" / "caption.json").read_text())["unavailable"]


def test_prepare_roles_shapes_world_is_prepared_once(tmp_path):
    from jetformer.data.stages import run_prepare

    cfg = _cfg("data.resolution=8", "data.min_image_side=8", "data.workers=1",
               "data.synthetic.num_train=24", "data.synthetic.num_val=4",
               "data.synthetic.bad_files=false", f"data.synthetic.out_dir={tmp_path / 'raw'}",
               *_role_dirs(tmp_path / "prepared"))
    for r in ROLES:
        run_prepare(cfg, r, metrics=tmp_path / "m" / f"{r}.json")
    for r in ROLES[1:]:
        assert role_data_dir(tmp_path / "prepared" / r) == tmp_path / "prepared" / "pretrain"
        assert read_role(tmp_path / "prepared" / r)["provides"] == [
            "captions", "labels", "qa", "attributes"]


# ----------------------------------------------------------------------------- judge / FID
def test_judge_only_where_there_are_labels_or_attributes(tmp_path):
    from jetformer.eval.judge import JudgeUnavailable, judge_targets_reason, judge_unavailable
    from jetformer.eval.judge import load_judge, scene_targets
    from jetformer.eval.stages import run_judge

    coco_items = [{"label": -1, "attributes": {}}, {"label": -1, "attributes": None}]
    assert "no class labels or scene attributes" in judge_targets_reason(
        [scene_targets(it) for it in coco_items])
    assert judge_targets_reason([{"label": "0"}, {"label": "1"}]) == ""
    assert "nothing to tell apart" in judge_targets_reason([{"label": "0"}, {"label": "0"}])
    shapes = [{"label": 0, "attributes": {"objects": [{"shape": s, "color": "red"}], "count": 1}}
              for s in ("circle", "square")]
    assert judge_targets_reason([scene_targets(it) for it in shapes]) == ""

    from jetformer.data.stages import run_prepare
    cfg = _cfg("data.source=coco", "data.resolution=8", "data.min_image_side=8",
               "data.workers=1", *_paths("coco"), *_role_dirs(tmp_path / "prepared"))
    for r in ("pretrain", "fid"):
        run_prepare(cfg, r, metrics=tmp_path / "m" / f"{r}.json")
    result = run_judge(cfg, out=tmp_path / "judge.pt", metrics=tmp_path / "judge.json")
    assert result["judge_val_accuracy"] is None and result["judge_val_accuracy_unavailable"]
    assert "no class labels" in judge_unavailable(tmp_path / "judge.pt")
    with pytest.raises(JudgeUnavailable, match="no domain judge"):
        load_judge(tmp_path / "judge.pt")


def test_choose_extractor(tmp_path, monkeypatch):
    from jetformer.eval.fidelity import choose_extractor

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))   # empty cache
    assert choose_extractor("auto", "synthetic", "") == ("domain", "")
    ext, note = choose_extractor("auto", "coco", "the reference source has no class labels")
    assert ext is None and "no meaningful feature extractor" in note and "inception" in note
    ext, note = choose_extractor("auto", "imagefolder", "")
    assert ext == "domain" and "not comparable to published FID" in note
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert choose_extractor("auto", "coco", "no labels", str(weights)) == ("inception", "")
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        choose_extractor("auto", "coco", "no labels", str(tmp_path / "missing.pth"))
    assert choose_extractor("domain", "coco", "no labels")[0] is None
    assert choose_extractor("inception", "coco", "no labels") == ("inception", "")


def _random_inception_weights(path: Path, monkeypatch) -> None:
    """torch-fidelity's Inception-v3 with its random initialisation, saved as a state dict (the
    real file is a 91 MB download; the FID code path is the same)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})   # no download
    monkeypatch.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict",
                        lambda self, sd, strict=True: None)
    torch.manual_seed(0)
    net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save(net.state_dict(), path)


def test_inception_fid_is_torch_fidelity_standard_fid(tmp_path, monkeypatch):
    import torch_fidelity

    from jetformer.eval.fidelity import ImageTensorDataset, fidelity_metrics

    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights, monkeypatch)
    g = torch.Generator().manual_seed(0)
    fake = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=g)
    real = torch.randint(0, 128, (3, 16, 16, 3), dtype=torch.uint8, generator=g)
    ours = fidelity_metrics(fake, real, extractor="inception", inception_weights=str(weights),
                            batch_size=3, device="cpu", kid_subsets=2)
    standard = torch_fidelity.calculate_metrics(   # torch-fidelity's FID: all defaults
        input1=ImageTensorDataset(fake), input2=ImageTensorDataset(real), fid=True, cuda=False,
        feature_extractor_weights_path=str(weights), batch_size=3, verbose=False, cache=False)
    assert ours["fid"] == pytest.approx(standard["frechet_inception_distance"], rel=1e-6)
    assert ours["fid"] > 0
    evil = tmp_path / "evil.pth"                  # a pickle that is not a plain state dict
    torch.save({"fc.weight": torch.zeros(1), "x": Path("/")}, evil)
    with pytest.raises(ValueError, match="not a plain weights file"):
        fidelity_metrics(fake, real, extractor="inception", inception_weights=str(evil))


@pytest.mark.parametrize("preset, expected", [
    ("imagenet256", {"pretrain": "imagefolder", "caption": "none", "vqa": "none",
                     "zeroshot": "none", "fid": "imagefolder"}),
    ("coco_t2i", {"pretrain": "coco", "caption": "coco", "vqa": "vqav2",
                  "zeroshot": "imagefolder", "fid": "coco"}),
    ("coco_ti", {"pretrain": "coco", "caption": "coco", "vqa": "vqav2",
                 "zeroshot": "imagefolder", "fid": "coco"}),
])
def test_presets_name_every_role_in_the_official_layout(preset, expected):
    from jetformer.config import source_configured
    cfg = load_config(REPO / "params.yaml", overlays=["jetformer_b", preset])
    assert {r: role_source(cfg.data, r) for r in ROLES} == expected
    for source in set(expected.values()) - {"none"}:
        assert source_configured(cfg.data, source)
        section = getattr(cfg.data, source)
        assert all(str(v).startswith("data/") for v in vars(section).values() if v), section
    if "vqav2" in expected.values():   # VQAv2 is annotated on the COCO 2014 images
        assert cfg.data.vqav2.val_images == cfg.data.coco.val_images == "data/coco/val2014"
        assert cfg.data.vqav2.val_questions.endswith("v2_OpenEnded_mscoco_val2014_questions.json")
