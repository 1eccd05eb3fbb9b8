"""`prepare`: bad files skipped/converted with reasons, the Arrow schema, a known image through
resize + crop computed by hand, clear failures, and an interrupted run restarted == a clean run."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jetformer.config import REPO_ROOT, load_config
from jetformer.data import synthetic
from jetformer.data.prepare import PrepareError, arrow_schema, prepare, prepare_metrics
from jetformer.data.readers import BadFile, load_image


def cfg_for(tmp: Path, *extra: str):
    return load_config(REPO_ROOT / "params.yaml", overrides=(
        f"data.synthetic.out_dir={tmp / 'raw'}", f"data.prepared_dir={tmp / 'prepared'}",
        "data.synthetic.num_train=20", "data.synthetic.num_val=12", "data.resolution=16",
        "data.workers=1", "data.shard_size=8", "data.max_bad_fraction=0.5", *extra))


def read_split(prepared: Path, split: str) -> pa.Table:
    meta = json.loads((prepared / "metadata.json").read_text())
    return pa.concat_tables([pa.ipc.open_file(prepared / split / f).read_all()
                             for f in meta["shards"][split]])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = cfg_for(tmp)
    return cfg, prepare(cfg)


def test_every_bad_file_kind_skipped_or_converted_with_reason(prepared):
    cfg, report = prepared
    kinds = synthetic.BROKEN_KINDS + synthetic.CONVERTED_KINDS
    for split, first_id in (("train", 0), ("val", cfg.data.synthetic.num_train)):
        s = report["splits"][split]
        skipped = {x["id"]: x["reason"] for x in s["skipped_files"]}
        converted = {x["id"]: x["reason"] for x in s["converted_files"]}
        reason = {k: skipped.get(str(first_id + i)) or converted.get(str(first_id + i))
                  for i, k in enumerate(kinds)}
        assert set(skipped) == {str(first_id + i) for i in range(len(synthetic.BROKEN_KINDS))}
        assert "truncated" in reason["truncated"]
        assert reason["zero_bytes"] == "zero bytes"
        assert "not an image" in reason["not_an_image"]
        assert "too small" in reason["tiny"]
        assert "L -> RGB" in reason["grayscale"]
        assert "RGBA -> RGB" in reason["rgba"]
        assert "P -> RGB" in reason["palette"]
        assert "CMYK -> RGB" in reason["cmyk"]
        assert reason["huge"] is None           # plain downscaling: counted, not listed
        assert 1 <= s["downscaled_huge"] <= s["resized"] <= s["written"]
        odd = str(first_id + len(kinds))
        assert "odd Unicode" in converted[odd]
        assert s["written"] == s["files"] - len(synthetic.BROKEN_KINDS)
        assert s["written"] + s["skipped"] + s["ignored"] == s["files_found"] == s["files"]
    metrics = prepare_metrics(report)
    assert len(metrics["skipped_files"]) == 2 * len(synthetic.BROKEN_KINDS)
    assert all(x["reason"] for x in metrics["skipped_files"])
    saved = json.loads((Path(cfg.data.prepared_dir) / "prepare_report.json").read_text())
    assert saved["splits"]["val"]["skipped_files"] == report["splits"]["val"]["skipped_files"]


def test_converted_rows_hold_the_right_content(prepared):
    cfg, _ = prepared
    table = read_split(Path(cfg.data.prepared_dir), "train")
    rows = {r["id"]: r for r in table.to_pylist()}
    kinds = synthetic.BROKEN_KINDS + synthetic.CONVERTED_KINDS
    gray = np.array(rows[str(kinds.index("grayscale"))]["image"], np.uint8).reshape(16, 16, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    odd = rows[str(len(kinds))]
    main = odd["attributes"]["objects"][0]
    # NFKC + controls gone
    assert odd["captions"][0].startswith(f"a {main['color']} {main['shape']}")
    assert all("\u200b" not in c and "\x07" not in c for c in odd["captions"])


def test_arrow_schema_and_metadata(prepared):
    cfg, _ = prepared
    out = Path(cfg.data.prepared_dir)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["classes"] == sorted(synthetic.SHAPES) and meta["image_shape"] == [16, 16, 3]
    table = read_split(out, "train")
    assert table.schema.equals(arrow_schema(16), check_metadata=True)
    assert table.num_rows == meta["num_train"] == 20 - len(synthetic.BROKEN_KINDS)
    assert [len(pa.ipc.open_file(out / "train" / f).read_all())
            for f in meta["shards"]["train"]] == [4, 8, 4]
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["image"]) == 16 * 16 * 3 and len(row["captions"]) == 5 and len(row["qa"]) == 4
    assert meta["classes"][row["label"]] == row["attributes"]["objects"][0]["shape"]
    assert not list(out.parent.glob("prepared.partial-*"))             # work dir renamed into place


def area_halve(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean of neighbouring pairs along `axis`, rounded half up to uint8 (one resample pass)."""
    pairs = np.moveaxis(a.astype(np.int64), axis, 0)
    out = (pairs[0::2] + pairs[1::2] + 1) // 2
    return np.moveaxis(out, 0, axis).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_known_image_resize_and_central_crop_by_hand(tmp_path, fmt):
    """16x24 (HxW) -> shorter side 8: factor-2 area averaging (Pillow: a horizontal pass, then
    a vertical one, each rounded to uint8) -> 8x12 -> the central 8 columns start at
    (12 - 8) // 2 = 2, i.e. they come from source columns 4..19."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(src).save(path, format=fmt)
    got, notes = load_image(path, 8)
    expected = area_halve(area_halve(src[:, 4:20], axis=1), axis=0)        # [8, 8, 3]
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8 and notes == []
    np.testing.assert_array_equal(got, expected)
    # ... and the same pixels come out of `prepare` into the Arrow shard
    for split in ("train", "val"):
        (tmp_path / "src" / split / "cls").mkdir(parents=True)
        Image.fromarray(src).save(tmp_path / "src" / split / "cls" / f"img.{fmt.lower()}",
                                  format=fmt)
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=(
        "data.source=imagefolder", "model.conditioning=class", "train.task=class",
        f"data.imagefolder.train_images={tmp_path / 'src' / 'train'}",
        f"data.imagefolder.val_images={tmp_path / 'src' / 'val'}", "data.resolution=8",
        "data.min_image_side=4", f"data.prepared_dir={tmp_path / 'prepared'}", "data.workers=1"))
    prepare(cfg)
    row = read_split(tmp_path / "prepared", "val").to_pylist()[0]
    np.testing.assert_array_equal(np.array(row["image"], np.uint8).reshape(8, 8, 3), got)


def test_tall_image_crops_rows_not_columns(tmp_path):
    src = np.zeros((40, 20, 3), np.uint8)
    src[:10], src[10:30], src[30:] = 255, 100, 255                         # bright bands top/bottom
    Image.fromarray(src).save(tmp_path / "t.png")
    got, _ = load_image(tmp_path / "t.png", 10)                       # 40x20 -> 20x10 -> rows 5..14
    assert got.shape == (10, 10, 3) and (got == 100).all()


def test_clear_errors(tmp_path):
    base = ("data.source=imagefolder", "model.conditioning=class", "train.task=class",
            "data.workers=1", f"data.prepared_dir={tmp_path / 'out'}")
    missing = load_config(REPO_ROOT / "params.yaml", overrides=base + (
        f"data.imagefolder.train_images={tmp_path / 'nope'}",
        f"data.imagefolder.val_images={tmp_path}"))
    with pytest.raises(PrepareError, match=r"data\.imagefolder\.train_images.*not found"):
        prepare(missing)
    (tmp_path / "empty").mkdir()
    empty = load_config(REPO_ROOT / "params.yaml", overrides=base + (
        f"data.imagefolder.train_images={tmp_path / 'empty'}",
        f"data.imagefolder.val_images={tmp_path}"))
    with pytest.raises(PrepareError, match="no class sub-directories"):
        prepare(empty)
    unset = load_config(REPO_ROOT / "params.yaml", overrides=("data.source=coco",))
    with pytest.raises(PrepareError, match=r"data\.coco\.train_images is empty"):
        prepare(unset)
    # too many bad files: 4 of 20 broken > 5%
    with pytest.raises(PrepareError, match=r"4 of 20 files .* data\.max_bad_fraction=0\.05"):
        prepare(cfg_for(tmp_path, "data.max_bad_fraction=0.05"))
    assert not (tmp_path / "prepared").exists()                            # nothing half-written


def test_unreadable_reasons(tmp_path):
    with pytest.raises(BadFile, match="file not found"):
        load_image(tmp_path / "missing.png", 8)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(BadFile):
        load_image(tmp_path / "a.png", 8)


def test_interrupted_then_restarted_equals_clean_run(tmp_path):
    clean = cfg_for(tmp_path / "clean")
    prepare(clean)

    class Interrupt(Exception):
        pass

    done = []

    def crash_after_two(outcome):
        done.append(outcome["file"])
        if len(done) == 2:
            raise Interrupt

    cfg = cfg_for(tmp_path / "restart")
    with pytest.raises(Interrupt):
        prepare(cfg, on_shard_done=crash_after_two)
    assert not (tmp_path / "restart" / "prepared").exists()                # no half-written output
    partial = list((tmp_path / "restart").glob("prepared.partial-*"))
    assert len(partial) == 1 and len(list(partial[0].rglob("*.arrow"))) == 2
    redone = []
    two_workers = cfg_for(tmp_path / "restart", "data.workers=2")        # parallel path, same bytes
    prepare(two_workers, on_shard_done=lambda o: redone.append(o["file"]))
    assert len(redone) == 5 - 2                                            # finished shards reused
    a, b = Path(clean.data.prepared_dir), Path(cfg.data.prepared_dir)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix == ".arrow")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*")
                           if p.is_file() and p.suffix == ".arrow")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "metadata.json").read_text() == (b / "metadata.json").read_text()


def test_max_images_keeps_every_class(tmp_path):
    fix = Path(__file__).parent / "fixtures" / "imagefolder"         # class 0: 2 images, class 1: 1
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=(
        "data.source=imagefolder", "model.conditioning=class", "train.task=class",
        f"data.imagefolder.train_images={fix / 'train'}",
        f"data.imagefolder.val_images={fix / 'val'}", "data.resolution=8", "data.workers=1",
        "data.max_images=2", f"data.prepared_dir={tmp_path / 'prepared'}"))
    report = prepare(cfg)
    assert report["splits"]["train"]["files"] == 2
    assert read_split(tmp_path / "prepared", "train").column("label").to_pylist() == [0, 1]


def test_world_generation_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        prepare(cfg_for(tmp_path))
    assert (tmp_path / "raw" / "precious.txt").exists()
