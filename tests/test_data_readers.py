"""The hand-written official-format fixtures (tests/fixtures/) parse with the same readers that
read the shapes world, and `prepare` turns each into Arrow shards."""
import dataclasses
import json
from pathlib import Path

import pytest

from jetformer.config import REPO_ROOT, load_config
from jetformer.data import readers
from jetformer.data.dataset import ArrowImageDataset, read_metadata
from jetformer.data.prepare import prepare

FIX = Path(__file__).parent / "fixtures"


def test_imagefolder_fixture():
    classes, records = readers.read_imagefolder(FIX / "imagefolder" / "train")
    assert classes == ["n01443537", "n01530575"]
    assert [(r.id, r.label) for r in records] == [
        ("n01443537/n01443537_10007.JPEG", 0), ("n01443537/n01443537_2.JPEG", 0),
        ("n01530575/n01530575_10018.JPEG", 1)]


def test_coco_captions_fixture():
    records = readers.read_coco_captions(FIX / "coco/annotations/captions_train2014.json",
                                         FIX / "coco/train2014")
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["25", "9"]
    assert len(by_id["9"].captions) == 3 and by_id["9"].captions[0].startswith("Closeup of bins")
    assert by_id["25"].captions[1] == "A giraffe standing up nearby a tree"     # NBSP normalised
    assert any("normalised" in n for n in by_id["25"].notes)
    assert Path(by_id["9"].path).name == "COCO_train2014_000000000009.jpg"


def test_vqav2_fixture():
    records = readers.read_vqav2(FIX / "vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
                                 FIX / "vqav2/v2_mscoco_train2014_annotations.json",
                                 FIX / "coco/train2014")
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["25", "9"]
    q = by_id["9"].qa
    assert [x["question"] for x in q] == ["How many bowls are there?", "Is there broccoli?"]
    assert len(q[0]["answers"]) == 10 and q[0]["answers"].count("4") == 7
    assert q[0]["answer_type"] == "number" and q[0]["question_type"] == "how many"
    assert Path(by_id["25"].path).name == "COCO_train2014_000000000025.jpg"  # found by image id


def test_missing_fields_are_named(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(readers.SourceError, match="missing field 'file_name'"):
        readers.read_coco_captions(bad, FIX / "coco/train2014", "data.coco.train_annotations")
    bad.write_text("{not json")
    with pytest.raises(readers.SourceError,
                       match=r"data\.coco\.train_annotations = .*not valid JSON"):
        readers.read_coco_captions(bad, FIX / "coco/train2014", "data.coco.train_annotations")


def _prepare(tmp_path, *overrides, source: str = "synthetic"):
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=(
        "data.resolution=8", "data.min_image_side=8", "data.workers=1",
        f"data.prepared_dir={tmp_path / 'prepared'}", *overrides))
    # prepare() reads any source kind (a role's source, e.g. VQAv2 for data.roles.vqa)
    prepare(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=source)))
    return tmp_path / "prepared"


@pytest.mark.parametrize("source", ["imagefolder", "coco", "vqav2"])
def test_fixture_prepares(tmp_path, source):
    if source == "imagefolder":
        paths = [f"data.imagefolder.train_images={FIX / 'imagefolder/train'}",
                 f"data.imagefolder.val_images={FIX / 'imagefolder/val'}"]
    else:
        paths = [f"data.{source}.{s}_images={FIX / 'coco' / (s + '2014')}"
                 for s in ("train", "val")]
        if source == "coco":
            paths += [f"data.coco.{s}_annotations="
                      f"{FIX / 'coco/annotations' / f'captions_{s}2014.json'}"
                      for s in ("train", "val")]
        else:
            paths += [f"data.vqav2.{s}_questions="
                      f"{FIX / 'vqav2' / f'v2_OpenEnded_mscoco_{s}2014_questions.json'}"
                      for s in ("train", "val")]
            paths += [f"data.vqav2.{s}_annotations="
                      f"{FIX / 'vqav2' / f'v2_mscoco_{s}2014_annotations.json'}"
                      for s in ("train", "val")]
    out = _prepare(tmp_path, *paths, source=source)
    meta = read_metadata(out)
    ds = ArrowImageDataset(out, "val")
    items = [ds[i] for i in range(len(ds))]
    assert meta["num_val"] == len(items) == 2
    assert all(it["image"].shape == (8, 8, 3) for it in items)
    if source == "imagefolder":
        assert (meta["classes"] == ["n01443537", "n01530575"]
                and [it["label"] for it in items] == [0, 1])
        assert meta["num_train"] == 3
    elif source == "coco":
        assert meta["classes"] == [] and all(it["label"] == -1 for it in items)
        assert {it["id"]: len(it["captions"]) for it in items} == {"42": 2, "73": 2}
    else:
        assert {it["id"]: it["qa"][0]["answers"].count("red") for it in items}["42"] == 9
        assert all(it["attributes"] == {} and it["captions"] == [] for it in items)
