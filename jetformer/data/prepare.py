"""`prepare` stage: any source -> `prepared_dir/{train,val}/shard-XXXXX.arrow`.

Every image is decoded, converted to RGB, its shorter side resized to `data.resolution`
(area averaging) and centre-cropped; broken files are skipped and reported with their reason.
Every file found under a source's image root is accounted for: written (possibly converted,
saying how), skipped (why) or ignored (why: hidden, not an image extension, not listed in the
annotations, ...); `files_found = written + skipped + ignored` per split, checked, and
`prepared_dir/files.tsv` has one line per file. Listed images whose file is missing and
annotations that point at unlisted images are counted too.
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
from jetformer.safe_io import atomic_write, atomic_write_json, atomic_write_text

SPLITS = ("train", "val")
LISTING_FILE = "files.tsv"
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
def read_source(cfg, split: str, stats: dict | None = None) -> tuple[list[str], list[Record]]:
    """(classes, records) of one split of the configured `data.source`; annotation counts
    (e.g. `annotations_without_image`) go to `stats`."""
    d = cfg.data
    try:
        if d.source == "synthetic":
            return readers.read_synthetic(d.synthetic.out_dir, split)
        section = getattr(d, d.source)
        images = getattr(section, f"{split}_images")
        key = f"data.{d.source}.{split}_"
        if d.source == "imagefolder":
            return readers.read_imagefolder(images, key + "images", allow_empty=split != "train")
        if d.source == "coco":
            return [], readers.read_coco_captions(getattr(section, f"{split}_annotations"), images,
                                                  key + "annotations", stats)
        if d.source == "vqav2":
            return [], readers.read_vqav2(getattr(section, f"{split}_questions"),
                                          getattr(section, f"{split}_annotations"), images,
                                          (key + "questions", key + "annotations", key + "images"),
                                          stats)
    except SourceError as e:
        raise PrepareError(f"data.source={d.source!r}, split '{split}': {e}") from None
    raise PrepareError(f"unknown data.source {d.source!r}")


def source_root(cfg, split: str) -> Path:
    """The image directory of one split of the configured source."""
    d = cfg.data
    if d.source == "synthetic":
        from jetformer.data.synthetic import world_paths
        return Path(world_paths(d.synthetic.out_dir, split)["images"])
    return Path(getattr(getattr(d, d.source), f"{split}_images"))


def ignore_reason(path: Path, root: Path, source: str, by_id: dict | None = None) -> str:
    """Why a file under `root` that no record uses is not part of the data."""
    rel = path.relative_to(root)
    if any(part.startswith(".") for part in rel.parts):
        return "hidden"
    if path.suffix.lower() not in readers.IMAGE_EXTENSIONS:
        return f"not an image extension ({path.suffix or 'none'})"
    if source in ("imagefolder", "synthetic") and len(rel.parts) == 1:
        return "not inside a class directory"
    if source == "coco":
        return "not listed in the annotations JSON"
    if source == "vqav2":
        image_id = readers.image_id_of(path)
        if image_id is None:
            return "no image id at the end of the file name"
        kept = (by_id or {}).get(image_id)
        if kept is not None and kept != path:
            return f"another file has the same image id {image_id}: {kept.name}"
        return f"no question about image id {image_id}"
    return "not read by the reader"


def account_files(root: Path, records: list[Record], left_out: list[Record], source: str
                  ) -> tuple[int, list[dict]]:
    """(number of files under `root`, `{"file", "reason"}` of each that is not an image of
    `records`; `left_out`: records dropped by `data.max_images`)."""
    used = {os.path.realpath(r.path) for r in records}
    dropped = {os.path.realpath(r.path) for r in left_out}
    by_id = readers.index_by_image_id(root) if source == "vqav2" else None
    ignored, found = [], 0
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        found += 1
        real = os.path.realpath(p)
        if real in used:
            continue
        reason = ("left out by data.max_images" if real in dropped
                  else ignore_reason(p, root, source, by_id))
        ignored.append({"file": str(p), "reason": reason})
    return found, ignored


def _check_unique_ids(records: list[Record], split: str) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.id in seen:
            raise PrepareError(f"split '{split}': id {r.id!r} is used by two images "
                               f"({seen[r.id]} and {r.path})")
        seen[r.id] = r.path


# ----------------------------------------------------------------------------- shards
def _shard_rows(records: list[dict], resolution: int, min_side: int, stats: dict):
    ids, images, labels, captions, qas, attributes, skipped, converted = (
        [], [], [], [], [], [], [], [])
    for r in records:
        if not os.path.isfile(r["path"]):
            stats["missing"].append({"id": r["id"], "file": r["path"], "reason": "file not found"})
            continue
        try:
            pixels, notes = readers.load_image(r["path"], resolution, min_side, stats)
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
    stats: dict = {"missing": [], "resized": 0, "downscaled_huge": 0}
    ids, images, labels, captions, qas, attributes, skipped, converted = _shard_rows(
        records, resolution, min_side, stats)
    schema = arrow_schema(resolution)
    flat = np.concatenate(images) if images else np.zeros(0, np.uint8)
    image_col = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint8()),
                                                  resolution * resolution * 3)
    table = pa.Table.from_arrays([
        pa.array(ids, pa.string()), image_col, pa.array(labels, pa.int32()),
        pa.array(captions, pa.list_(pa.string())), pa.array(qas, pa.list_(QA_TYPE)),
        pa.array(attributes, ATTRIBUTES_TYPE)], schema=schema)
    def write(f):
        with pa.ipc.new_file(f, schema) as writer:
            writer.write_table(table)
    atomic_write(path, write)
    paths = {r["id"]: r["path"] for r in records}
    outcome = {"file": os.path.basename(path), "written": len(ids), "skipped": skipped,
               "converted": converted, "missing": stats["missing"],
               "resized": stats["resized"], "downscaled_huge": stats["downscaled_huge"],
               "written_files": [[i, paths[i]] for i in ids],
               "label_counts": {str(k): labels.count(k) for k in sorted(set(labels))},
               "seconds": time.perf_counter() - t0}
    _write_json(path[: -len(".arrow")] + ".json", outcome)
    return outcome


def _write_json(path: str | Path, obj) -> None:
    atomic_write_json(path, obj, indent=1, ensure_ascii=False)


def _shard_done(arrow_path: Path) -> bool:
    return arrow_path.is_file() and arrow_path.with_suffix(".json").is_file()


# ----------------------------------------------------------------------------- prepare
def _work_hash(cfg, listing: dict) -> str:
    d = cfg.data
    key = {"version": FORMAT_VERSION, "outcomes": 2, "source": d.source, "resolution": d.resolution,
           "shard_size": d.shard_size, "max_images": d.max_images,
           "min_image_side": d.min_image_side,
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
    splits, source_stats, ignored, found = {}, {}, {}, {}
    for split in SPLITS:
        source_stats[split] = {}
        classes, records = read_source(cfg, split, source_stats[split])
        _check_unique_ids(records, split)
        left_out: list[Record] = []
        if d.max_images and len(records) > d.max_images:   # evenly spaced: every class stays in
            keep = np.unique(np.linspace(0, len(records) - 1, d.max_images).round().astype(int))
            kept = set(keep.tolist())
            left_out = [r for i, r in enumerate(records) if i not in kept]
            records = [records[i] for i in keep]
        splits[split] = (classes, records)
        found[split], ignored[split] = account_files(source_root(cfg, split), records,
                                                     left_out, d.source)
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
    listing_rows = []
    for split, (_, records) in splits.items():
        outcomes = [json.loads(p.read_text()) for p in sorted((work / split).glob("shard-*.json"))]
        skipped = [x for o in outcomes for x in o["skipped"]]
        missing = [x for o in outcomes for x in o["missing"]]
        converted = [x for o in outcomes for x in o["converted"]]
        total = len(records)
        by_reason: dict[str, int] = {}
        for x in ignored[split]:
            by_reason[x["reason"]] = by_reason.get(x["reason"], 0) + 1
        s = report["splits"][split] = {
            "files": total, "files_found": found[split],
            "written": sum(o["written"] for o in outcomes),
            "converted": len(converted), "skipped": len(skipped), "ignored": len(ignored[split]),
            "missing": len(missing),
            "resized": sum(o["resized"] for o in outcomes),
            "downscaled_huge": sum(o["downscaled_huge"] for o in outcomes),
            **source_stats[split],
            "shards": [o["file"] for o in outcomes if o["written"]],
            "shard_sizes": [o["written"] for o in outcomes if o["written"]],
            "skipped_files": skipped, "converted_files": converted, "missing_files": missing,
            "ignored_by_reason": by_reason, "ignored_files": ignored[split]}
        if s["written"] + s["skipped"] + s["ignored"] != s["files_found"]:
            raise PrepareError(   # a file would vanish without a line: never silently
                f"split '{split}': {s['files_found']} files under {source_root(cfg, split)}, "
                f"but {s['written']} "
                f"written + {s['skipped']} skipped + {s['ignored']} ignored (files listed twice?)")
        how = {x["file"]: x["reason"] for x in converted}
        listing_rows += [(split, "converted" if f in how else "written", i, f, how.get(f, ""))
                         for o in outcomes for i, f in o["written_files"]]
        listing_rows += [(split, "skipped", x["id"], x["file"], x["reason"]) for x in skipped]
        listing_rows += [(split, "missing", x["id"], x["file"], x["reason"]) for x in missing]
        listing_rows += [(split, "ignored", "", x["file"], x["reason"]) for x in ignored[split]]
        if split == "train" and classes:
            counts: dict[str, int] = {}
            for o in outcomes:
                for k, v in o["label_counts"].items():
                    counts[k] = counts.get(k, 0) + v
            empty = [c for i, c in enumerate(classes) if not counts.get(str(i))]
            if empty:
                raise PrepareError(
                    f"split 'train' of data.source={d.source!r}: no usable image in class "
                    f"directories {empty[:5]} ({len(empty)} of {len(classes)}; every file "
                    "there was skipped, see the reasons above): a class without examples "
                    "would shift every later label")
        bad = (len(skipped) + len(missing)) / max(total, 1)
        if report["splits"][split]["written"] == 0:
            raise PrepareError(f"split '{split}' of data.source={d.source!r}: none of the "
                               f"{total} files could be read; first reasons: "
                               f"{_first_reasons(skipped + missing)}")
        if bad > d.max_bad_fraction:
            raise PrepareError(
                f"split '{split}' of data.source={d.source!r}: {len(skipped) + len(missing)} of "
                f"{total} files ({bad:.1%}) are unreadable or missing, more than "
                f"data.max_bad_fraction={d.max_bad_fraction}; "
                f"first reasons: {_first_reasons(skipped + missing)}")
    for split in SPLITS:   # shards without rows (all skipped) are dropped
        for o in sorted((work / split).glob("shard-*.json")):
            if json.loads(o.read_text())["written"] == 0:
                o.with_suffix(".arrow").unlink()
    elapsed = time.perf_counter() - t0
    n_files = sum(len(r) for _, r in splits.values())
    report["seconds"] = {"total": elapsed, "generate": t_read - t0,
                         "prepare": time.perf_counter() - t_read}
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
    _write_listing(work / LISTING_FILE, listing_rows)
    for split in SPLITS:   # per-shard outcome files are folded into the report
        for o in (work / split).glob("shard-*.json"):
            o.unlink()
    _swap_in(work, out_dir)
    return report


def _write_listing(path: Path, rows: list[tuple]) -> None:
    """`files.tsv`: split, status (written | converted | skipped | missing | ignored), id, file,
    how or why; tabs and newlines inside a field become spaces."""
    def clean(v) -> str:
        return " ".join(str(v).split("\t")).replace("\n", " ")
    lines = ["split\tstatus\tid\tfile\tdetail"] + ["\t".join(map(clean, r)) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


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
        futures = [pool.submit(write_shard, chunk, path, resolution, min_side)
                   for chunk, path in jobs]
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
    counts = ("files_found", "written", "converted", "skipped", "ignored", "missing", "resized",
              "downscaled_huge", "annotations_without_image", "annotations_without_question")
    for split, s in report["splits"].items():
        m[split] = {k: s[k] for k in counts if k in s}
        m[split]["ignored_by_reason"] = s["ignored_by_reason"]
    m["skipped_files"] = [{"split": split, "file": x["file"], "reason": x["reason"]}
                          for split, s in report["splits"].items() for x in s["skipped_files"]]
    m["converted_files"] = [{"split": split, "file": x["file"], "reason": x["reason"]}
                            for split, s in report["splits"].items() for x in s["converted_files"]]
    m["missing_files"] = [{"split": split, "file": x["file"], "reason": x["reason"]}
                          for split, s in report["splits"].items() for x in s["missing_files"]]
    return m
