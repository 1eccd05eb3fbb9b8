"""Every file under a source root is accounted for by `prepare`: written, converted (how),
skipped (why) or ignored (why), with `written + skipped + ignored == files_found` and one line
per file in `files.tsv`; ids unique within a split; empty ImageFolder classes refused; COCO /
VQAv2 missing files and annotations of unlisted images counted."""
import csv
import json
import os
import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from jetformer.config import REPO_ROOT, load_config
from jetformer.data.prepare import LISTING_FILE, PrepareError, prepare, prepare_metrics


def _img(path: Path, size=(24, 20), color=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


def _junk(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _cfg(tmp: Path, source: str, **paths):
    """`source` read by prepare() as a role's data (VQAv2, or an ImageFolder for a text model,
    cannot be the pretraining source: the config validation refuses them there)."""
    over = ["data.resolution=8", "data.workers=1", "data.shard_size=3",
            "data.max_bad_fraction=1.0", f"data.prepared_dir={tmp / 'prepared'}"]
    over += [f"data.{source}.{k}={v}" for k, v in paths.items()]
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=over)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=source))


def _listing(prepared: Path) -> list[dict]:
    with open(prepared / LISTING_FILE, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _all_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def _check_accounting(report: dict, prepared: Path, roots: dict[str, Path]) -> dict:
    rows = _listing(prepared)
    for split, root in roots.items():
        s = report["splits"][split]
        assert s["written"] + s["skipped"] + s["ignored"] == s["files_found"]
        assert s["files_found"] == len(_all_files(root))
        files = [r["file"] for r in rows if r["split"] == split and r["status"] != "missing"]
        assert sorted(files) == sorted(_all_files(root))                # each file exactly once
        assert all(r["detail"] for r in rows if r["status"] in ("skipped", "ignored", "missing",
                                                                  "converted"))
    return {(r["split"], os.path.relpath(r["file"], roots[r["split"]])): r for r in rows}


def test_imagefolder_every_file_accounted_for_and_ids_unique(tmp_path):
    tr, va = tmp_path / "train", tmp_path / "val"
    _img(tr / "a/x.jpg")
    _img(tr / "a/x.png", color=(0, 200, 0))                             # same stem as x.jpg
    _img(tr / "a/sub/deep.png")
    _img(tr / "a/.hidden.jpg")
    _junk(tr / "a/notes.txt", b"hello")
    _img(tr / "b/y.bmp")
    _img(tr / "b/gray.png", mode="L")
    _junk(tr / "b/broken.jpg", b"\xff\xd8\xff" + os.urandom(200))
    _junk(tr / "b/Thumbs.db", os.urandom(64))
    _junk(tr / "README.md", b"# my data")
    _img(tr / "stray.png")
    _img(tr / ".cache/z.jpg")
    _img(va / "a/v.jpg")
    _img(va / "b/w.jpg")
    report = prepare(_cfg(tmp_path, "imagefolder", train_images=tr, val_images=va))
    rows = _check_accounting(report, tmp_path / "prepared", {"train": tr, "val": va})
    status = {k[1]: (r["status"], r["detail"]) for k, r in rows.items() if k[0] == "train"}
    assert status["a/x.jpg"][0] == status["a/x.png"][0] == status["a/sub/deep.png"][0] == "written"
    assert rows[("train", "a/x.jpg")]["id"] == "a/x.jpg" != rows[("train", "a/x.png")]["id"]
    assert status["b/gray.png"] == ("converted", "converted L -> RGB")
    assert status["b/broken.jpg"][0] == "skipped"
    assert status["a/.hidden.jpg"] == ("ignored", "hidden")
    assert status[".cache/z.jpg"] == ("ignored", "hidden")
    assert status["a/notes.txt"] == ("ignored", "not an image extension (.txt)")
    assert status["b/Thumbs.db"] == ("ignored", "not an image extension (.db)")
    assert status["README.md"] == ("ignored", "not an image extension (.md)")
    assert status["stray.png"] == ("ignored", "not inside a class directory")
    s = report["splits"]["train"]
    assert (s["files_found"], s["written"], s["converted"], s["skipped"], s["ignored"]) == \
        (12, 5, 1, 1, 6)
    m = prepare_metrics(report)
    assert m["train"]["ignored_by_reason"]["hidden"] == 2
    assert json.loads((tmp_path / "prepared/prepare_report.json").read_text())["splits"] == \
        report["splits"]


def test_max_images_left_out_files_are_listed(tmp_path):
    tr = tmp_path / "train"
    for i in range(6):
        _img(tr / f"{'ab'[i % 2]}/{i}.png")
    _img(tmp_path / "val/a/v.png")
    _img(tmp_path / "val/b/w.png")
    cfg = _cfg(tmp_path, "imagefolder", train_images=tr, val_images=tmp_path / "val")
    cfg.data.max_images = 3
    report = prepare(cfg)
    s = report["splits"]["train"]
    assert s["written"] == 3 and s["ignored_by_reason"] == {"left out by data.max_images": 3}
    _check_accounting(report, tmp_path / "prepared", {"train": tr, "val": tmp_path / "val"})


def test_empty_class_directory_is_refused_naming_it(tmp_path):
    tr, va = tmp_path / "train", tmp_path / "val"
    _img(tr / "a/x.png")
    _junk(tr / "b_empty/readme.txt", b"nothing here")
    _img(tr / "c/y.png")
    _img(va / "a/x.png")
    with pytest.raises(PrepareError, match=r"class directories without any image file \(b_empty"):
        prepare(_cfg(tmp_path, "imagefolder", train_images=tr, val_images=va))
    assert not (tmp_path / "prepared").exists()
    # the val split may lack a class: labels come from the training split's class list
    _img(tr / "b_empty/z.png")
    _img(va / "c/w.png")
    (va / "b_empty").mkdir()
    report = prepare(_cfg(tmp_path, "imagefolder", train_images=tr, val_images=va))
    assert report["classes"] == ["a", "b_empty", "c"]
    from jetformer.data.dataset import ArrowImageDataset
    assert sorted(it["label"] for it in ArrowImageDataset(tmp_path / "prepared", "val")) == [0, 2]


def test_class_whose_every_image_is_broken_is_refused(tmp_path):
    tr, va = tmp_path / "train", tmp_path / "val"
    _img(tr / "a/x.png")
    _junk(tr / "b/bad1.jpg", os.urandom(100))
    _junk(tr / "b/bad2.png", b"")
    _img(tr / "c/y.png")
    for c in "abc":
        _img(va / c / "v.png")
    with pytest.raises(PrepareError, match=r"no usable image in class directories \['b'\]"):
        prepare(_cfg(tmp_path, "imagefolder", train_images=tr, val_images=va))


def _coco_json(path: Path, images: list[tuple[int, str]], captions: list[tuple[int, str]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f} for i, f in images],
        "annotations": [{"id": k, "image_id": i, "caption": c}
                        for k, (i, c) in enumerate(captions)]}))
    return path


def test_coco_missing_files_unlisted_images_and_orphan_captions_counted(tmp_path):
    roots = {}
    for split in ("train", "val"):
        d = roots[split] = tmp_path / split
        _img(d / "COCO_1.jpg")
        _img(d / "COCO_2.jpg", size=(64, 48))                         # huge for 8x8: counted
        _img(d / "extra.jpg")                                         # not in the JSON
        _coco_json(tmp_path / f"{split}.json",
                   [(1, "COCO_1.jpg"), (2, "COCO_2.jpg"), (3, "COCO_3.jpg")],   # 3: no file
                   [(1, "a cat"), (2, "a dog"), (3, "a cow"), (9, "orphan"), (9, "orphan 2")])
    report = prepare(_cfg(tmp_path, "coco", train_images=roots["train"],
                          val_images=roots["val"], train_annotations=tmp_path / "train.json",
                          val_annotations=tmp_path / "val.json"))
    rows = _check_accounting(report, tmp_path / "prepared", roots)
    s = report["splits"]["train"]
    assert (s["files_found"], s["written"], s["ignored"], s["missing"]) == (3, 2, 1, 1)
    assert s["annotations_without_image"] == 2
    assert s["downscaled_huge"] == 1 and s["converted"] == 0          # counted, not listed
    assert rows[("train", "extra.jpg")]["detail"] == "not listed in the annotations JSON"
    assert [x["id"] for x in s["missing_files"]] == ["3"]
    assert prepare_metrics(report)["train"]["annotations_without_image"] == 2


def test_coco_image_id_listed_twice_is_refused(tmp_path):
    _img(tmp_path / "im/a.jpg")
    _coco_json(tmp_path / "a.json", [(1, "a.jpg"), (1, "b.jpg")], [(1, "x")])
    cfg = _cfg(tmp_path, "coco", train_images=tmp_path / "im", val_images=tmp_path / "im",
               train_annotations=tmp_path / "a.json", val_annotations=tmp_path / "a.json")
    with pytest.raises(PrepareError, match="image id 1 is listed twice"):
        prepare(cfg)


def test_vqav2_files_without_questions_duplicate_ids_and_orphan_answers(tmp_path):
    roots = {}
    for split in ("train", "val"):
        d = roots[split] = tmp_path / split
        _img(d / "COCO_000001.jpg")
        _img(d / "COCO_1.png")                                       # same image id 1
        _img(d / "COCO_5.jpg")                                       # no question about it
        _img(d / "cover.jpg")                                        # no id in the name
        qs = [{"question_id": 10, "image_id": 1, "question": "what?"},
              {"question_id": 20, "image_id": 2, "question": "who?"}]      # image 2: no file
        ans = [{"question_id": q, "answers": [{"answer": "yes"}] * 10} for q in (10, 20, 30)]
        (tmp_path / f"{split}_q.json").write_text(json.dumps({"questions": qs}))
        (tmp_path / f"{split}_a.json").write_text(json.dumps({"annotations": ans}))
    report = prepare(_cfg(tmp_path, "vqav2", train_images=roots["train"], val_images=roots["val"],
                          train_questions=tmp_path / "train_q.json",
                          val_questions=tmp_path / "val_q.json",
                          train_annotations=tmp_path / "train_a.json",
                          val_annotations=tmp_path / "val_a.json"))
    rows = _check_accounting(report, tmp_path / "prepared", roots)
    s = report["splits"]["train"]
    assert (s["files_found"], s["written"], s["ignored"], s["missing"]) == (4, 1, 3, 1)
    assert s["annotations_without_question"] == 1
    assert rows[("train", "COCO_1.png")]["detail"] == \
        "another file has the same image id 1: COCO_000001.jpg"
    assert rows[("train", "COCO_5.jpg")]["detail"] == "no question about image id 5"
    assert rows[("train", "cover.jpg")]["detail"] == "no image id at the end of the file name"
