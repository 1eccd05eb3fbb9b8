"""`prepare` stage: any source -> `prepared_dir/{train,val}/shard-XXXXX.arrow` (DESIGN §4).

Every image is decoded, converted to RGB, its shorter side resized to `data.resolution`
(area averaging) and centre-cropped; broken files are skipped and reported with their reason.
Shards are Arrow IPC files with a fixed schema (`ARROW_SCHEMA`), written by parallel worker
processes. Work happens in `<prepared_dir>.partial-<hash>/`: each shard is written atomically
(temp + rename) next to a small JSON of its outcome, so an interrupted run that is restarted
reuses the finished shards and produces the same files; the directory is renamed to
`prepared_dir` only when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa

from jetformer.data import readers
from jetformer.data.readers import BadFile, Record, SourceError
from jetformer.progress import progress

SPLITS = ("train", "val")
FORMAT_VERSION = 1

OBJECT_TYPE = pa.struct([("shape", pa.string()), ("color", pa.string()),
                         ("size", pa.string()), ("position", pa.string())])
ATTRIBUTES_TYPE = pa.struct([("objects", pa.list_(OBJECT_TYPE)), ("count", pa.int32()),
                             ("background", pa.string())])
QA_TYPE = pa.struct([("question", pa.string()), ("answers", pa.list_(pa.string())),
                     ("answer_type", pa.string()), ("question_type", pa.string())])


def arrow_schema(resolution: int) -> pa.Schema:
    """id, image (uint8 H*W*3, row-major HWC), label (-1 = none), captions, qa, attributes."""
    return pa.schema([
        ("id", pa.string()),
        ("image", pa.list_(pa.uint8(), resolution * resolution * 3)),
        ("label", pa.int32()),
        ("captions", pa.list_(pa.string())),
        ("qa", pa.list_(QA_TYPE)),
        ("attributes", ATTRIBUTES_TYPE),
    ], metadata={"image_shape": json.dumps([resolution, resolution, 3]),
                 "format_version": str(FORMAT_VERSION)})


class PrepareError(RuntimeError):
    """The source cannot be prepared (missing, empty, too many bad files)."""


# ----------------------------------------------------------------------------- sources
def read_source(cfg, split: str) -> tuple[list[str], list[Record]]:
    """(classes, records) of one split of the configured `data.source`."""
    d = cfg.data
    try:
        if d.source == "synthetic":
            return readers.read_synthetic(d.synthetic.out_dir, split)
        section = getattr(d, d.source)
        images = getattr(section, f"{split}_images")
        key = f"data.{d.source}.{split}_"
        if d.source == "imagefolder":
            return readers.read_imagefolder(images, key + "images")
        if d.source == "coco":
            return [], readers.read_coco_captions(getattr(section, f"{split}_annotations"), images,
                                                  key + "annotations")
        if d.source == "vqav2":
            return [], readers.read_vqav2(getattr(section, f"{split}_questions"),
                                          getattr(section, f"{split}_annotations"), images,
                                          (key + "questions", key + "annotations", key + "images"))
    except SourceError as e:
        raise PrepareError(f"data.source={d.source!r}, split '{split}': {e}") from None
    raise PrepareError(f"unknown data.source {d.source!r}")


# ----------------------------------------------------------------------------- shards
def _shard_rows(records: list[dict], resolution: int, min_side: int):
    ids, images, labels, captions, qas, attributes, skipped, converted = [], [], [], [], [], [], [], []
    for r in records:
        try:
            pixels, notes = readers.load_image(r["path"], resolution, min_side)
        except BadFile as e:
            skipped.append({"id": r["id"], "file": r["path"], "reason": str(e)})
            continue
        notes = r["notes"] + notes
        if notes:
            converted.append({"id": r["id"], "file": r["path"], "reason": "; ".join(notes)})
        ids.append(r["id"])
        images.append(pixels.reshape(-1))
        labels.append(r["label"])
        captions.append(r["captions"])
        qas.append(r["qa"])
        attributes.append(r["attributes"])
    return ids, images, labels, captions, qas, attributes, skipped, converted


def write_shard(records: list[dict], path: str, resolution: int, min_side: int) -> dict:
    """Decode `records` and write one Arrow IPC shard atomically; returns its outcome."""
    t0 = time.perf_counter()
    ids, images, labels, captions, qas, attributes, skipped, converted = _shard_rows(
        records, resolution, min_side)
    schema = arrow_schema(resolution)
    flat = np.concatenate(images) if images else np.zeros(0, np.uint8)
    image_col = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint8()), resolution * resolution * 3)
    table = pa.Table.from_arrays([
        pa.array(ids, pa.string()), image_col, pa.array(labels, pa.int32()),
        pa.array(captions, pa.list_(pa.string())), pa.array(qas, pa.list_(QA_TYPE)),
        pa.array(attributes, ATTRIBUTES_TYPE)], schema=schema)
    tmp = path + ".tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    outcome = {"file": os.path.basename(path), "written": len(ids), "skipped": skipped,
               "converted": converted, "seconds": time.perf_counter() - t0}
    _write_json(path[: -len(".arrow")] + ".json", outcome)
    return outcome


def _write_json(path: str | Path, obj) -> None:
    path = str(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _shard_done(arrow_path: Path) -> bool:
    return arrow_path.is_file() and arrow_path.with_suffix(".json").is_file()


# ----------------------------------------------------------------------------- prepare
def _work_hash(cfg, listing: dict) -> str:
    d = cfg.data
    key = {"version": FORMAT_VERSION, "source": d.source, "resolution": d.resolution,
           "shard_size": d.shard_size, "max_images": d.max_images, "min_image_side": d.min_image_side,
           "source_cfg": asdict(getattr(d, d.source)), "listing": listing}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def prepare(cfg, on_shard_done=None) -> dict:
    """Prepare `cfg.data` into `cfg.data.prepared_dir`; returns the report (also written as
    `prepare_report.json`). `on_shard_done(outcome)` is called after every finished shard."""
    d = cfg.data
    t0 = time.perf_counter()
    if d.source == "synthetic":
        from jetformer.data.synthetic import generate_world
        generate_world(d.synthetic)
    t_read = time.perf_counter()
    splits = {}
    for split in SPLITS:
        classes, records = read_source(cfg, split)
        if d.max_images and len(records) > d.max_images:   # evenly spaced: every class stays in
            keep = np.unique(np.linspace(0, len(records) - 1, d.max_images).round().astype(int))
            records = [records[i] for i in keep]
        splits[split] = (classes, records)
    classes = splits["train"][0]
    if splits["val"][0] and splits["val"][0] != classes:
        raise PrepareError(f"class directories differ between train ({classes}) and val "
                           f"({splits['val'][0]})")
    listing = {s: [[r.id, r.path, os.path.getsize(r.path) if os.path.isfile(r.path) else -1]
                   for r in recs] for s, (_, recs) in splits.items()}
    out_dir = Path(d.prepared_dir)
    work = out_dir.parent / f"{out_dir.name}.partial-{_work_hash(cfg, listing)}"
    for stale in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
        if stale != work:
            shutil.rmtree(stale)

    jobs = []
    for split, (_, records) in splits.items():
        (work / split).mkdir(parents=True, exist_ok=True)
        for k, start in enumerate(range(0, len(records), d.shard_size)):
            path = work / split / f"shard-{k:05d}.arrow"
            if not _shard_done(path):
                chunk = [asdict(r) for r in records[start:start + d.shard_size]]
                jobs.append((chunk, str(path)))
    _run_jobs(jobs, d.resolution, d.min_image_side, d.workers, on_shard_done)

    report = {"source": d.source, "resolution": d.resolution, "classes": classes, "splits": {}}
    for split, (_, records) in splits.items():
        outcomes = [json.loads(p.read_text()) for p in sorted((work / split).glob("shard-*.json"))]
        skipped = [x for o in outcomes for x in o["skipped"]]
        total = len(records)
        report["splits"][split] = {
            "files": total, "written": sum(o["written"] for o in outcomes), "skipped": len(skipped),
            "converted": sum(len(o["converted"]) for o in outcomes),
            "shards": [o["file"] for o in outcomes if o["written"]],
            "shard_sizes": [o["written"] for o in outcomes if o["written"]],
            "skipped_files": skipped,
            "converted_files": [x for o in outcomes for x in o["converted"]]}
        bad = len(skipped) / max(total, 1)
        if report["splits"][split]["written"] == 0:
            raise PrepareError(f"split '{split}' of data.source={d.source!r}: none of the {total} files "
                               f"could be read; first reasons: {_first_reasons(skipped)}")
        if bad > d.max_bad_fraction:
            raise PrepareError(
                f"split '{split}' of data.source={d.source!r}: {len(skipped)} of {total} files "
                f"({bad:.1%}) are unreadable, more than data.max_bad_fraction={d.max_bad_fraction}; "
                f"first reasons: {_first_reasons(skipped)}")
    for split in SPLITS:   # shards without rows (all skipped) are dropped
        for o in sorted((work / split).glob("shard-*.json")):
            if json.loads(o.read_text())["written"] == 0:
                o.with_suffix(".arrow").unlink()
    elapsed = time.perf_counter() - t0
    n_files = sum(len(r) for _, r in splits.values())
    report["seconds"] = {"total": elapsed, "generate": t_read - t0, "prepare": time.perf_counter() - t_read}
    report["images_per_s"] = n_files / max(report["seconds"]["prepare"], 1e-9)
    metadata = {"format_version": FORMAT_VERSION, "source": d.source, "classes": classes,
                "resolution": d.resolution, "image_shape": [d.resolution, d.resolution, 3],
                "num_train": report["splits"]["train"]["written"],
                "num_val": report["splits"]["val"]["written"],
                "shards": {s: report["splits"][s]["shards"] for s in SPLITS}}
    _write_json(work / "metadata.json", metadata)
    # no timings in the output: the same data prepared again must hash the same for DVC
    _write_json(work / "prepare_report.json",
                {k: v for k, v in report.items() if k not in ("seconds", "images_per_s")})
    for split in SPLITS:   # per-shard outcome files are folded into the report
        for o in (work / split).glob("shard-*.json"):
            o.unlink()
    _swap_in(work, out_dir)
    return report


def _first_reasons(skipped: list[dict], n: int = 3) -> str:
    return "; ".join(f"{x['file']}: {x['reason']}" for x in skipped[:n]) or "none"


def _run_jobs(jobs, resolution: int, min_side: int, workers: int, on_shard_done) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for chunk, path in progress(jobs, "prepare shards"):
            outcome = write_shard(chunk, path, resolution, min_side)
            if on_shard_done:
                on_shard_done(outcome)
        return
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(write_shard, chunk, path, resolution, min_side) for chunk, path in jobs]
        for f in progress(futures, "prepare shards"):
            outcome = f.result()
            if on_shard_done:
                on_shard_done(outcome)


def _swap_in(work: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished `work` dir (two renames; no half-written state)."""
    old = out_dir.parent / f"{out_dir.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old.exists():
        shutil.rmtree(old)


def prepare_metrics(report: dict) -> dict:
    """The `metrics/prepare.json` view: counts, speed and a reason per skipped file."""
    m = {"images_per_s": round(report["images_per_s"], 1),
         "seconds": round(report["seconds"]["total"], 2)}
    for split, s in report["splits"].items():
        m[split] = {"written": s["written"], "skipped": s["skipped"], "converted": s["converted"]}
    m["skipped_files"] = [{"split": split, "file": x["file"], "reason": x["reason"]}
                          for split, s in report["splits"].items() for x in s["skipped_files"]]
    m["converted_files"] = [{"split": split, "file": x["file"], "reason": x["reason"]}
                            for split, s in report["splits"].items() for x in s["converted_files"]]
    return m
