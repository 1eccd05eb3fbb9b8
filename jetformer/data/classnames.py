"""Human-readable class names for ImageFolder classes (zero-shot prompts, class prompts).

ImageNet's class directories are WordNet ids (`n01443537`); the name file maps them to words.
Accepted formats (read as data, never executed):
  - the synset mapping, one `<dir> <name>[, <synonym>...]` a line (ImageNet's
    `LOC_synset_mapping.txt` / `synset_words.txt`): the first synonym is the name;
  - one name a line, in class order (sorted directory names), exactly one line per class;
  - JSON `{"<dir>": "<name>"}` or `{"<index>": ["<dir>", "<name>"]}` (imagenet_class_index.json).
Underscores become spaces (`great_white_shark` -> `great white shark`).
"""
from __future__ import annotations

import json
from pathlib import Path


class ClassNameError(ValueError):
    """The class-name file is missing, malformed or does not cover every class."""


def _clean(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def _from_json(data, path: Path) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ClassNameError(f"{path}: JSON class names must be an object, "
                             f"got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if isinstance(value, str):
            out[str(key)] = value
        elif (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, str) for v in value)):
            out[value[0]] = value[1]
        else:
            raise ClassNameError(f"{path}: entry {key!r} must be a name or [dir, name], "
                                 f"got {value!r}")
    return out


def _from_text(lines: list[str], classes: list[str], path: Path) -> dict[str, str]:
    pairs = [line.split(None, 1) for line in lines]
    if pairs and all(len(p) == 2 for p in pairs):                    # `<dir> <name>` lines
        mapping = {p[0]: p[1].split(",")[0] for p in pairs}
        if set(classes) <= set(mapping):
            return mapping
    if len(lines) != len(classes):
        raise ClassNameError(
            f"{path}: neither a '<dir> <name>' mapping of the class directories nor one name "
            f"per class ({len(lines)} lines for {len(classes)} classes, e.g. {classes[:3]})")
    return dict(zip(classes, lines))


def read_class_names(path: str | Path, classes: list[str]) -> list[str]:
    """Names of `classes` (directory names, in label order) from the file at `path`."""
    p = Path(path)
    if not p.is_file():
        raise ClassNameError(f"data.imagefolder.class_names = '{path}': file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            mapping = _from_json(json.loads(text), p)
        except json.JSONDecodeError as e:
            raise ClassNameError(f"{p}: not valid JSON ({e})") from None
    else:
        mapping = _from_text([ln.strip() for ln in text.splitlines() if ln.strip()], classes, p)
    missing = [c for c in classes if not _clean(mapping.get(c, ""))]
    if missing:
        raise ClassNameError(f"{p}: no name for {len(missing)} of {len(classes)} classes "
                             f"(first: {missing[:3]})")
    return [_clean(mapping[c]) for c in classes]
