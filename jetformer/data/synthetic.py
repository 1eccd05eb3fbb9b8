"""The embedded "shapes" world: a seeded procedural data set written in the
on-disk formats of the real sources, so that `prepare` reads it with the real readers.

Layout under `out_dir` (one tree per split, `train` and `val`):

    images/<split>/<shape>/<image_id:06d>.{png,jpg}     ImageFolder (class = main object's shape)
    annotations/captions_<split>.json                   COCO captions (`images`, `annotations`)
    annotations/questions_<split>.json                  VQAv2 questions
    annotations/answers_<split>.json                    VQAv2 annotations (10 answers each)
    annotations/attributes_<split>.json                 ground-truth scene attributes by image_id
    world.json                                          the parameters that produced the tree

Scenes are designed to be learnable by a ~1.5M-parameter model at 32x32 px: 4 shapes,
6 well-separated colours on dark backgrounds, the main object large and at one of three
horizontal positions, 0-2 small extra objects in the corners (1-3 objects in all). Objects
are drawn inside the central square of the canvas only, so the central crop of `prepare`
never cuts one; the extra width or height of non-square images is background.
Each image is generated from its own seed `(seed, split, index)`: same seed, same bytes.

World variants (`data.synthetic.world`): `shapes` (above: flat colours, a faint gradient) and
`photo`, the same scenes, attributes and files, but every background is a crop of a real
photograph bundled inside scikit-image (`skimage.data`, no download) laid over the shapes
world's background ("plain" a low-contrast crop, "textured" a high-contrast one), and every object
is filled with its colour modulated by a crop of a bundled grayscale texture photo (brick, grass,
gravel). Natural high-frequency detail, which flat colours lack, is what the noise curriculum
and the factoring of the paper (§3.2) are about, and it makes PNG a realistic reference.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jetformer.progress import progress
from jetformer.safe_io import atomic_write_bytes, atomic_write_json

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {                       # name -> RGB, far apart in RGB and hue
    "red": (220, 40, 40),
    "green": (50, 190, 60),
    "blue": (50, 100, 235),
    "yellow": (240, 220, 50),
    "purple": (170, 70, 210),
    "white": (240, 240, 240),
}
BACKGROUNDS = {                  # name -> RGB, dark so every object colour stands out
    "black": (18, 18, 18),
    "gray": (80, 80, 80),
    "brown": (85, 55, 35),
}
TEXTURES = ("plain", "textured")
POSITIONS = {"left": 0.30, "center": 0.50, "right": 0.70}   # main object's centre x (fraction)
CORNERS = {"top left": (0.12, 0.12), "top right": (0.88, 0.12),
           "bottom left": (0.12, 0.88), "bottom right": (0.88, 0.88)}
MAIN_SIZE = (0.42, 0.48)         # main object's side as a fraction of the central square
SMALL_SIZE = (0.18, 0.22)        # extra objects: main spans y <= 0.5+0.01+0.24 < 0.88-0.11
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SPLIT_CODES = {"train": 0, "val": 1}
WORLDS = ("shapes", "photo")
# photographs shipped inside the scikit-image package (files under skimage/data/, no download)
PHOTO_BACKGROUNDS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                     "immunohistochemistry", "retina")
PHOTO_TEXTURES = ("brick", "grass", "gravel")
PHOTO_CONTRAST = {"plain": 0.35, "textured": 0.8}   # background: photo deviation kept around tint

# Deliberately bad files (issue 3): broken ones must be skipped, unusual ones converted.
BROKEN_KINDS = ("truncated", "zero_bytes", "not_an_image", "tiny")
CONVERTED_KINDS = ("grayscale", "rgba", "palette", "cmyk", "huge")
# zero-width space, no-break space, a control char, fullwidth letters, an em dash, an emoji
ODD_UNICODE_CAPTION = "\u200ba\u00a0 {color} {shape}\u0007 \u2014 ｎｉｃｅ \U0001F600 "


# ----------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator) -> dict:
    """Scene attributes `{"objects": [main, *extras], "count", "background"}` (api.md)."""
    main = {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))),
            "size": "large", "position": str(rng.choice(list(POSITIONS)))}
    count = int(rng.integers(1, 4))
    corners = [str(c) for c in rng.permutation(list(CORNERS))[:count - 1]]
    extras = [{"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))),
               "size": "small", "position": c} for c in corners]
    background = f"{rng.choice(TEXTURES)} {rng.choice(list(BACKGROUNDS))}"
    return {"objects": [main] + extras, "count": count, "background": background}


def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    h = side / 2
    if shape == "triangle":                       # upright, fills the box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":                          # a plus sign, arms one third of the side
        a = side / 6
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a),
                (cx + h, cy + a), (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h),
                (cx - a, cy + a), (cx - h, cy + a), (cx - h, cy - a), (cx - a, cy - a)]
    return None


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A photograph bundled with scikit-image as float32 [H, W, C] (C = 3, or 1 for gray)."""
    from skimage import data
    img = np.asarray(getattr(data, name)(), dtype=np.float32)
    return img[..., None] if img.ndim == 2 else img[..., :3]


def photo_crop(name: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of bundled photo `name` (side 1/4 to 3/4 of the photo's shorter side, the
    canvas' aspect ratio), resized to float32 [height, width, C]."""
    img = _photo(name)
    H, W = img.shape[:2]
    side = rng.uniform(0.25, 0.75) * min(H, W)
    ch, cw = (side, side * width / height) if width <= height else (side * height / width, side)
    ch, cw = max(2, int(min(ch, H))), max(2, int(min(cw, W)))
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    crop = img[y:y + ch, x:x + cw]
    chans = [np.asarray(Image.fromarray(crop[..., c]).resize((width, height), Image.BILINEAR))
             for c in range(crop.shape[2])]
    return np.stack(chans, axis=-1).astype(np.float32)


def _background(texture: str, bg_name: str, width: int, height: int, rng):
    bg = np.array(BACKGROUNDS[bg_name], np.float32)
    if texture == "textured":                     # a mild vertical gradient + faint noise
        ramp = np.linspace(-14.0, 14.0, height, dtype=np.float32)[:, None, None]
        noise = rng.normal(0.0, 4.0, (height, width, 1)).astype(np.float32)
        return bg + ramp + noise
    return np.broadcast_to(bg, (height, width, 3))


def render_scene(scene: dict, width: int, height: int, rng: np.random.Generator,
                 world: str = "shapes") -> Image.Image:
    """RGB image of `scene`; objects live in the central `min(width, height)` square.
    `world="photo"`: photo-crop background and photo-textured objects (module docstring)."""
    if world not in WORLDS:
        raise ValueError(f"data.synthetic.world={world!r}: must be one of {list(WORLDS)}")
    texture, bg_name = scene["background"].split(" ")
    pixels = _background(texture, bg_name, width, height, rng)
    if world == "photo":  # photo draws from a spawned child: `rng` moves as in the shapes world
        prng = rng.spawn(1)[0]
        crop = photo_crop(str(prng.choice(PHOTO_BACKGROUNDS)), width, height, prng)
        pixels = pixels + PHOTO_CONTRAST[texture] * (crop - crop.mean(axis=(0, 1)))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    if world == "photo":
        return _draw_textured_objects(image, scene, rng, prng)
    draw = ImageDraw.Draw(image)
    for obj, cx, cy, side in _object_boxes(scene, width, height, rng):
        _draw_shape(draw, obj["shape"], cx, cy, side, COLORS[obj["color"]])
    return image


def _object_boxes(scene: dict, width: int, height: int, rng: np.random.Generator):
    """(cx, cy, side) of each object, the main one jittered (same draws as the shapes world)."""
    s = min(width, height)
    x0, y0 = (width - s) / 2, (height - s) / 2
    for i, obj in enumerate(scene["objects"]):
        if i == 0:
            side = s * rng.uniform(*MAIN_SIZE)
            cx = x0 + s * (POSITIONS[obj["position"]] + rng.uniform(-0.03, 0.03))
            cy = y0 + s * (0.5 + rng.uniform(-0.01, 0.01))
        else:
            side = s * rng.uniform(*SMALL_SIZE)
            fx, fy = CORNERS[obj["position"]]
            cx, cy = x0 + s * fx, y0 + s * fy
        yield obj, cx, cy, side


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill):
    h = side / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, side), fill=fill)


def _draw_textured_objects(image: Image.Image, scene: dict, rng, prng) -> Image.Image:
    """Each object: its colour x (0.75 + 0.5 * a texture-photo crop in [0, 1]) inside its mask
    (the hue, hence the colour name, stays; the brightness varies like the photo)."""
    out = np.asarray(image, np.float32).copy()
    W, H = image.size
    for obj, cx, cy, side in _object_boxes(scene, W, H, rng):
        mask = Image.new("L", (W, H), 0)
        _draw_shape(ImageDraw.Draw(mask), obj["shape"], cx, cy, side, 255)
        m = np.asarray(mask, np.float32)[..., None] / 255.0
        tex = photo_crop(str(prng.choice(PHOTO_TEXTURES)), W, H, prng) / 255.0   # [H, W, 1]
        fill = np.array(COLORS[obj["color"]], np.float32) * (0.75 + 0.5 * (tex - tex.mean()))
        out = out * (1 - m) + fill * m
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- text
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}"


def make_captions(scene: dict, rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` distinct captions from varied templates; each names the main colour and shape."""
    main, extras = scene["objects"][0], scene["objects"][1:]
    c, s, pos = main["color"], main["shape"], main["position"]
    bg = scene["background"].split(" ")[1]
    count = scene["count"]
    others = " and ".join(f"{_article(o['color'])} {o['color']} {o['shape']}" for o in extras)
    templates = [
        f"a {c} {s}",
        f"a {c} {s} {_where(pos)}",
        f"a large {c} {s} on a {bg} background",
        f"there is a {c} {s} {_where(pos)}",
        f"a big {c} {s} and {NUMBER_WORDS[count - 1]} small shape{'s' * (count > 2)}" if count > 1
        else f"a single {c} {s}",
        f"{NUMBER_WORDS[count]} shapes, the largest is a {c} {s}" if count > 1
        else f"just one {c} {s} on a {bg} background",
        f"a {c} {s} with {others}" if extras else f"a lone {c} {s} {_where(pos)}",
        f"a picture of a {c} {s}",
    ]
    picks = rng.permutation(len(templates))[:n]
    return [templates[i] for i in sorted(picks)]


def _answers(truth: str, wrong: list[str], rng: np.random.Generator, variants: dict | None = None
             ) -> list[str]:
    """10 annotator answers: mostly the truth, sometimes 1-3 disagreeing (as in VQAv2)."""
    answers = [truth] * 10
    if rng.random() < 0.3:
        for j in rng.permutation(10)[: int(rng.integers(1, 4))]:
            answers[j] = str(rng.choice(wrong))
    if variants and truth in variants and rng.random() < 0.2:   # e.g. "two" for "2"
        answers[int(rng.integers(0, 10))] = variants[truth]
    return answers


def make_qa(scene: dict, rng: np.random.Generator) -> list[dict]:
    """Four VQAv2-style questions: shape, colour, count, yes/no."""
    main = scene["objects"][0]
    others_shape = [x for x in SHAPES if x != main["shape"]]
    others_color = [x for x in COLORS if x != main["color"]]
    count = scene["count"]
    qa = [
        {"question": "what shape is the large object?", "question_type": "what shape is the",
         "answer_type": "other", "answers": _answers(main["shape"], others_shape, rng)},
        {"question": f"what color is the large {main['shape']}?", "question_type": "what color is the",
         "answer_type": "other", "answers": _answers(main["color"], others_color, rng)},
        {"question": "how many shapes are there?", "question_type": "how many",
         "answer_type": "number",
         "answers": _answers(str(count), [str(k) for k in (1, 2, 3, 4) if k != count], rng,
                             variants={str(k): w for k, w in NUMBER_WORDS.items()})},
    ]
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    if rng.random() < 0.5:
        color, shape, truth = main["color"], main["shape"], "yes"
    else:
        while True:
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            if (color, shape) not in present:
                break
        truth = "no"
    qa.append({"question": f"is there {_article(color)} {color} {shape}?", "question_type": "is there a",
               "answer_type": "yes/no",
               "answers": _answers(truth, ["no" if truth == "yes" else "yes"], rng)})
    return qa


# ----------------------------------------------------------------------------- files
def _encode(image: Image.Image, fmt: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=int(rng.integers(88, 96)))
    return buf.getvalue()


def _bad_file(kind: str, image: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Bytes and extension of a deliberately bad file of `kind` made from a good scene image."""
    if kind == "truncated":
        data = _encode(image, "png", rng)
        return data[: len(data) // 2], "png"
    if kind == "zero_bytes":
        return b"", "jpg"
    if kind == "not_an_image":
        return b"<html><body>404 Not Found</body></html>\n", "jpg"
    if kind == "tiny":
        return _encode(image.resize((6, 5), Image.BOX), "png", rng), "png"
    if kind == "grayscale":
        return _encode(image.convert("L"), "png", rng), "png"
    if kind == "rgba":                                # opaque scene, transparent outside the square
        rgba = image.convert("RGBA")
        alpha = np.zeros((image.height, image.width), np.uint8)
        s = min(image.size)
        x0, y0 = (image.width - s) // 2, (image.height - s) // 2
        alpha[y0:y0 + s, x0:x0 + s] = 255
        rgba.putalpha(Image.fromarray(alpha, "L"))
        return _encode(rgba, "png", rng), "png"
    if kind == "palette":
        return _encode(image.quantize(colors=64, method=Image.Quantize.MEDIANCUT), "png", rng), "png"
    if kind == "cmyk":
        buf = io.BytesIO()
        image.convert("CMYK").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    if kind == "huge":                                # ~13 MP, the same scene scaled up
        big = image.resize((image.width * 40, image.height * 40), Image.NEAREST)
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=85)
        return buf.getvalue(), "jpg"
    raise ValueError(f"unknown bad-file kind {kind!r}")


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=1, ensure_ascii=False)


def world_params(cfg) -> dict:
    """The parameters that determine the generated bytes (`world.json`)."""
    code = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]   # a changed generator regenerates
    return {"code": code, "num_train": cfg.num_train, "num_val": cfg.num_val, "seed": cfg.seed,
            "min_side": cfg.min_side, "max_side": cfg.max_side, "bad_files": cfg.bad_files,
            "world": cfg.world}


def generate_split(out_dir: Path, split: str, num_images: int, cfg) -> dict:
    """Write one split's images and annotation files; returns counts."""
    code = SPLIT_CODES[split]
    first_id = 0 if split == "train" else cfg.num_train          # COCO-like: ids unique overall
    bad_kinds = (BROKEN_KINDS + CONVERTED_KINDS) if cfg.bad_files else ()
    # bad files replace the first len(bad_kinds) images; the odd caption goes on the next one
    odd_caption_index = len(bad_kinds) if num_images > len(bad_kinds) else None
    img_root = out_dir / "images" / split
    for shape in SHAPES:
        (img_root / shape).mkdir(parents=True, exist_ok=True)
    coco_images, coco_anns, questions, vqa_anns, attributes = [], [], [], [], {}
    for i in progress(range(num_images), f"world {split}"):
        rng = np.random.default_rng([cfg.seed, code, i])
        image_id = first_id + i
        scene = sample_scene(rng)
        kind = bad_kinds[i] if i < len(bad_kinds) else None
        if kind == "grayscale":                               # gray keeps every attribute true
            for o in scene["objects"]:
                o["color"] = "white"
            scene["background"] = scene["background"].split(" ")[0] + " black"
        side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
        aspect = float(np.exp(rng.uniform(0.0, math.log(1.6))))
        long = int(round(side * aspect))
        width, height = (long, side) if rng.random() < 0.5 else (side, long)
        image = render_scene(scene, width, height, rng, cfg.world)
        fmt = "png" if rng.random() < 0.5 else "jpg"
        if kind is None:
            data = _encode(image, fmt, rng)
        else:
            data, fmt = _bad_file(kind, image, rng)
        file_name = f"{scene['objects'][0]['shape']}/{image_id:06d}.{fmt}"
        atomic_write_bytes(img_root / file_name, data)
        captions = make_captions(scene, rng)
        if i == odd_caption_index:
            main = scene["objects"][0]
            captions[0] = ODD_UNICODE_CAPTION.format(color=main["color"], shape=main["shape"])
        coco_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for c in captions:
            coco_anns.append({"id": len(coco_anns), "image_id": image_id, "caption": c})
        for k, q in enumerate(make_qa(scene, rng)):
            qid = image_id * 10 + k
            questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
            counts = {a: q["answers"].count(a) for a in q["answers"]}
            vqa_anns.append({
                "question_id": qid, "image_id": image_id, "question_type": q["question_type"],
                "answer_type": q["answer_type"], "multiple_choice_answer": max(counts, key=counts.get),
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(q["answers"])]})
        attributes[str(image_id)] = scene
    ann = out_dir / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    info = {"description": "JetFormer shapes world" + (f" ({cfg.world})" if cfg.world != "shapes"
                                                       else ""), "version": "1.0"}
    _write_json(ann / f"captions_{split}.json",
                {"info": info, "images": coco_images, "annotations": coco_anns})
    _write_json(ann / f"questions_{split}.json",
                {"info": info, "task_type": "Open-Ended", "data_type": "shapes",
                 "data_subtype": split, "questions": questions})
    _write_json(ann / f"answers_{split}.json",
                {"info": info, "data_type": "shapes", "data_subtype": split, "annotations": vqa_anns})
    _write_json(ann / f"attributes_{split}.json", attributes)
    return {"images": num_images, "bad_files": list(bad_kinds[:num_images]),
            "odd_unicode_caption_image_id": None if odd_caption_index is None
            else first_id + odd_caption_index}


def generate_world(cfg, out_dir: str | Path | None = None, force: bool = False) -> dict:
    """Write the shapes world for `cfg = Config.data.synthetic` (api.md).

    Skips the work when `out_dir/world.json` already records the same parameters (the tree is
    deterministic); `world.json` is written last, so an interrupted run is redone."""
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    params = world_params(cfg)
    stamp = out / "world.json"
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("params") == params:
                return json.loads(stamp.read_text())
        except json.JSONDecodeError:
            pass
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ("images", "annotations", "world.json"))
        if foreign:
            raise FileExistsError(f"data.synthetic.out_dir = '{out}' holds files that are not a shapes "
                                  f"world ({foreign[:3]}); refusing to overwrite it: choose another path")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary = {"params": params, "classes": sorted(SHAPES),
               "train": generate_split(out, "train", cfg.num_train, cfg),
               "val": generate_split(out, "val", cfg.num_val, cfg)}
    _write_json(stamp, summary)
    return summary


def world_paths(out_dir: str | Path, split: str) -> dict:
    """The real-format paths of one split of a generated world (what the readers take)."""
    out = Path(out_dir)
    ann = out / "annotations"
    return {"images": out / "images" / split, "captions": ann / f"captions_{split}.json",
            "questions": ann / f"questions_{split}.json", "answers": ann / f"answers_{split}.json",
            "attributes": ann / f"attributes_{split}.json"}

