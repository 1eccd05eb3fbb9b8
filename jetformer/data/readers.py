"""Readers of the real on-disk formats (ImageFolder, COCO captions, VQAv2) and the image
decoder of `prepare`. The shapes world is read by the very same functions.

A reader returns `Record`s: where an image lives and what is known about it. Decoding happens
later, in `load_image`, which either returns an RGB array resized and centre-cropped to the
model resolution (noting any conversion) or raises `BadFile` with the reason.
"""
from __future__ import annotations

import json
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_PIXELS = 64_000_000          # larger files are refused as decompression bombs


class BadFile(Exception):
    """An image file that cannot be used; the message is the reason written to the report."""


class SourceError(ValueError):
    """A source path or annotation file is missing, empty or malformed."""


@dataclass
class Record:
    """One image of a source, before decoding."""
    id: str
    path: str
    label: int = -1
    captions: list[str] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)
    attributes: dict | None = None
    notes: list[str] = field(default_factory=list)   # conversions already applied (e.g. text)


# ----------------------------------------------------------------------------- text
def normalize_text(text: str) -> str:
    """NFKC, control/format/private characters -> space, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    return " ".join(text.split())


def _clean_texts(texts: list[str], what: str, notes: list[str]) -> list[str]:
    out = []
    for t in texts:
        if not isinstance(t, str):
            raise SourceError(f"{what}: expected a string, got {t!r}")
        clean = normalize_text(t)
        if clean != t.strip():
            notes.append(f"{what} text normalised (odd Unicode): {t!r} -> {clean!r}")
        if clean:
            out.append(clean)
    return out


# ----------------------------------------------------------------------------- JSON helpers
def _load_json(path: str | Path, key: str) -> dict:
    p = Path(path)
    if not str(path):
        raise SourceError(f"{key} is empty: set it in params.yaml")
    if not p.is_file():
        raise SourceError(f"{key} = '{path}': file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(f"{key} = '{path}': not valid JSON ({e})") from None


def _require(obj: dict, name: str, path, key: str):
    if not isinstance(obj, dict) or name not in obj:
        raise SourceError(f"{key} = '{path}': missing field '{name}'")
    return obj[name]


def _require_list(obj: dict, name: str, path, key: str) -> list:
    value = _require(obj, name, path, key)
    if not isinstance(value, list):
        raise SourceError(f"{key} = '{path}': field '{name}' must be a list, "
                          f"got {type(value).__name__}")
    return value


def _require_id(obj: dict, name: str, path, key: str, text_ok: bool = True) -> int | str:
    """An id field: an integer (or, where `text_ok`, a string)."""
    value = _require(obj, name, path, key)
    if isinstance(value, bool) or not isinstance(value, (int, str) if text_ok else int):
        raise SourceError(f"{key} = '{path}': '{name}' {str(value)[:40]!r} is not "
                          f"{'an integer or text' if text_ok else 'an integer'}")
    return value


def _require_text(obj: dict, name: str, path, key: str) -> str:
    value = _require(obj, name, path, key)
    if not isinstance(value, str):
        raise SourceError(f"{key} = '{path}': '{name}' {str(value)[:40]!r} is not text")
    return value


def _check_dir(path: str | Path, key: str) -> Path:
    if not str(path):
        raise SourceError(f"{key} is empty: set it in params.yaml")
    p = Path(path)
    if not p.is_dir():
        raise SourceError(f"{key} = '{path}': directory not found")
    return p


def list_images(root: Path) -> list[Path]:
    """Image files (by extension) under `root`, sorted, recursively."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------- readers
def read_imagefolder(root: str | Path, key: str = "images", allow_empty: bool = False
                     ) -> tuple[list[str], list[Record]]:
    """ImageFolder (ImageNet layout): `root/<class>/<file>`; classes sorted by name; the id is
    the path under `root` with its extension (`a/x.jpg` and `a/x.png` are two images).

    A class directory without any image file is refused unless `allow_empty` (torchvision's
    ImageFolder semantics): in the training split it would be a class without examples. The
    val split may lack a class (`prepare` takes the class list from the training split)."""
    root = _check_dir(root, key)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"{key} = '{root}': no class sub-directories "
                          "(expected <root>/<class>/<image>)")
    records, empty = [], []
    for label, name in enumerate(classes):
        files = [p for p in list_images(root / name)
                 if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        if not files:
            empty.append(name)
        for p in files:
            records.append(Record(id=p.relative_to(root).as_posix(), path=str(p), label=label))
    if empty and not allow_empty:
        raise SourceError(f"{key} = '{root}': class directories without any image file "
                          f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}; "
                          f"{len(empty)} of {len(classes)}): a class without examples would "
                          "shift every later label; add images or remove the directories")
    return classes, records


def read_coco_captions(annotations: str | Path, images: str | Path, key: str = "annotations",
                       stats: dict | None = None) -> list[Record]:
    """COCO captions JSON (`images` with `file_name`, `annotations` with `image_id`, `caption`).

    `stats["annotations_without_image"]` counts captions whose `image_id` the JSON does not
    list. Image ids and file names listed twice are refused."""
    root = _check_dir(images, key.replace("annotations", "images"))
    data = _load_json(annotations, key)
    captions: dict[int | str, list[str]] = {}
    for a in _require_list(data, "annotations", annotations, key):
        captions.setdefault(_require_id(a, "image_id", annotations, key), []).append(
            _require_text(a, "caption", annotations, key))
    listed = _require_list(data, "images", annotations, key)
    ids = [_require_id(im, "id", annotations, key) for im in listed]
    names = [_require_text(im, "file_name", annotations, key) for im in listed]
    for name in names:
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise SourceError(f"{key} = '{annotations}': file_name {name[:60]!r} is not a "
                              "relative path inside the image directory")
    for what, values in (("image id", ids), ("file_name", names)):
        seen: set = set()
        for v in values:
            if v in seen:
                raise SourceError(f"{key} = '{annotations}': {what} {v!r} is listed twice")
            seen.add(v)
    if stats is not None:
        known = set(ids)
        stats["annotations_without_image"] = sum(len(c) for i, c in captions.items()
                                                 if i not in known)
    records = []
    for image_id, name in zip(ids, names):
        notes: list[str] = []
        caps = _clean_texts(captions.get(image_id, []), f"caption of image {image_id}", notes)
        records.append(Record(id=str(image_id), path=str(root / name), captions=caps, notes=notes))
    if not records:
        raise SourceError(f"{key} = '{annotations}': no images listed")
    return sorted(records, key=lambda r: r.path)


_TRAILING_INT = re.compile(r"(\d+)$")


def image_id_of(path: Path) -> int | None:
    """COCO-style file names end with the image id (`COCO_val2014_000000000042.jpg`)."""
    m = _TRAILING_INT.search(path.stem)
    return int(m.group(1)) if m else None


def index_by_image_id(root: Path) -> dict[int, Path]:
    """{image id: file} of the image files under `root` (the first, in sorted order, when two
    files end with the same id; `prepare` reports the other as ignored)."""
    out: dict[int, Path] = {}
    for p in list_images(root):
        i = image_id_of(p)
        if i is not None and not any(part.startswith(".") for part in p.relative_to(root).parts):
            out.setdefault(i, p)
    return out


def read_vqa(questions: str | Path, annotations: str | Path, qkey: str = "questions",
             akey: str = "annotations", stats: dict | None = None) -> dict[int, list[dict]]:
    """VQAv2 questions + annotations JSON -> `{image_id: [{"question", "answers" (10),
    "answer_type", "question_type"}]}` in question-id order.

    `stats["annotations_without_question"]` counts annotations whose `question_id` the
    questions JSON does not list."""
    qdata, adata = _load_json(questions, qkey), _load_json(annotations, akey)
    anns = {_require_id(a, "question_id", annotations, akey, text_ok=False): a
            for a in _require_list(adata, "annotations", annotations, akey)}
    qlist = _require_list(qdata, "questions", questions, qkey)
    qids = [_require_id(q, "question_id", questions, qkey, text_ok=False) for q in qlist]
    if stats is not None:
        asked = set(qids)
        stats["annotations_without_question"] = sum(1 for q in anns if q not in asked)
    out: dict[int, list[dict]] = {}
    for qid, q in sorted(zip(qids, qlist), key=lambda t: t[0]):
        a = anns.get(qid)
        if a is None:
            raise SourceError(f"{akey} = '{annotations}': no annotation for question_id {qid}")
        answers = [_require_text(x, "answer", annotations, akey)
                   for x in _require_list(a, "answers", annotations, akey)]
        notes: list[str] = []
        question = _clean_texts([_require(q, "question", questions, qkey)], f"question {qid}",
                                notes)
        image_id = _require_id(q, "image_id", questions, qkey, text_ok=False)
        out.setdefault(image_id, []).append({
            "question": question[0] if question else "",
            "answers": [normalize_text(x) for x in answers],
            "answer_type": str(a.get("answer_type", "")),
            "question_type": str(a.get("question_type", ""))})
    return out


def read_vqav2(questions: str | Path, annotations: str | Path, images: str | Path,
               keys: tuple[str, str, str] = ("questions", "annotations", "images"),
               stats: dict | None = None) -> list[Record]:
    """VQAv2: one record per image that has questions; the image file is found by its id."""
    root = _check_dir(images, keys[2])
    by_id = index_by_image_id(root)
    records = []
    for image_id, qa in sorted(read_vqa(questions, annotations, keys[0], keys[1],
                                        stats).items()):
        path = by_id.get(image_id)
        records.append(Record(id=str(image_id),
                              path=str(path) if path else str(root / f"<image {image_id}>"),
                              qa=qa))
    if not records:
        raise SourceError(f"{keys[0]} = '{questions}': no questions")
    return records


def read_synthetic(out_dir: str | Path, split: str) -> tuple[list[str], list[Record]]:
    """The shapes world: ImageFolder labels + COCO captions + VQAv2 QA + attributes, joined on
    the image id, all through the readers above."""
    from jetformer.data.synthetic import world_paths   # world layout only
    p = world_paths(out_dir, split)
    classes, records = read_imagefolder(p["images"], f"data.synthetic.out_dir (images/{split})",
                                        allow_empty=split != "train")
    coco = {r.path: r
            for r in read_coco_captions(p["captions"], p["images"], f"captions_{split}.json")}
    qa = read_vqa(p["questions"], p["answers"], f"questions_{split}.json", f"answers_{split}.json")
    attributes = _load_json(p["attributes"], f"attributes_{split}.json")
    for r in records:
        c = coco.get(r.path)
        if c is None:
            raise SourceError(f"captions_{split}.json: no entry for image file {r.path}")
        r.id, r.captions, r.notes = c.id, c.captions, c.notes
        r.qa = qa.get(int(c.id), [])
        r.attributes = attributes.get(c.id)
    return classes, sorted(records, key=lambda r: int(r.id))


# ----------------------------------------------------------------------------- images
def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side -> `resolution` by area averaging (antialiased; big_vision `resize_small`
    uses method "area"), then the central `resolution` x `resolution` crop."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BOX)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"converted {mode} -> RGB (alpha composited onto white)")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        notes.append(f"converted {mode} -> RGB (rescaled to 8 bits)")
        return Image.fromarray(arr, "L").convert("RGB")
    notes.append(f"converted {mode} -> RGB")
    return image.convert("RGB")


def load_image(path: str | Path, resolution: int, min_side: int = 1, stats: dict | None = None
               ) -> tuple[np.ndarray, list[str]]:
    """Decode, fix orientation, convert to RGB, resize + centre crop -> (uint8 [R, R, 3], notes).

    `notes` are conversions a user may want to look at (mode, alpha, bit depth); plain resizing
    is the normal path and only counted, in `stats["resized"]` (any other size than R x R) and
    `stats["downscaled_huge"]` (shorter side >= 4 R, decoded at a reduced JPEG scale).
    Raises BadFile(reason) for missing, empty, truncated, non-image, too-small or bomb files."""
    path = Path(path)
    if not path.is_file():
        raise BadFile("file not found")
    if path.stat().st_size == 0:
        raise BadFile("zero bytes")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                w, h = image.size
                if w * h > MAX_PIXELS:
                    raise BadFile(f"too large ({w}x{h} > {MAX_PIXELS} pixels)")
                if min(w, h) < min_side:
                    raise BadFile(f"too small ({w}x{h}, shorter side < "
                                  f"data.min_image_side={min_side})")
                counts = {"resized": (w, h) != (resolution, resolution),
                          "downscaled_huge": min(w, h) >= 4 * resolution}
                if counts["downscaled_huge"] and image.format == "JPEG":
                    # decode at a reduced DCT scale, still >= 2x the target
                    image.draft(image.mode, (max(1, w * 2 * resolution // min(w, h)),
                                             max(1, h * 2 * resolution // min(w, h))))
                image.load()
                orientation = image.getexif().get(0x0112, 1)
                image = ImageOps.exif_transpose(image)
                if orientation not in (0, 1):
                    notes.append(f"rotated upright (EXIF orientation {orientation})")
                image = _to_rgb(image, notes)
                image = resize_and_crop(image, resolution)
                pixels = np.asarray(image, dtype=np.uint8).copy()
                for k, v in counts.items():
                    if stats is not None and v:
                        stats[k] = stats.get(k, 0) + 1
                return pixels, notes
    except BadFile:
        raise
    except Image.UnidentifiedImageError:
        raise BadFile("not an image (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadFile(f"too large (decompression bomb: {e})") from None
    except Exception as e:  # noqa: BLE001 (any decoder failure on a malformed file)
        msg = " ".join(str(e).split())[:200]
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise BadFile(f"truncated image ({msg})") from None
        raise BadFile(f"unreadable image ({type(e).__name__}: {msg})") from None
