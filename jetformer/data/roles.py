"""The `role.json` of a role's prepared directory (`prepare@<role>`; roles: config.ROLES).

A role is fed by its own prepared data (`"data": "."`), by the pretraining data (`"data"` is
then `data.prepared_dir`: the shapes world fills every role from one generated world, and a
real source is not prepared twice), or by nothing (`"unavailable"` says why; the role's stages
then record that reason instead of a metric).
"""
from __future__ import annotations

import json
from pathlib import Path

from jetformer.safe_io import atomic_write_json

ROLE_FILE = "role.json"


def write_role(prepared_dir: str | Path, info: dict) -> None:
    """Atomically write `role.json` into `prepared_dir` (created if needed)."""
    atomic_write_json(Path(prepared_dir) / ROLE_FILE, info, indent=1, ensure_ascii=False)


def read_role(prepared_dir: str | Path) -> dict:
    """`role.json` of `prepared_dir`; a directory `prepare()` wrote directly (no role.json)
    is its own data."""
    path = Path(prepared_dir) / ROLE_FILE
    if not path.is_file():
        if not (Path(prepared_dir) / "metadata.json").is_file():
            raise FileNotFoundError(f"{prepared_dir}: no prepared data (run `dvc repro prepare`)")
        return {"data": ".", "unavailable": "", "class_names": None}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or "data" not in info:
        raise ValueError(f"{path}: not a role file (no 'data' field)")
    return info


def role_data_dir(prepared_dir: str | Path) -> Path | None:
    """The directory holding the role's Arrow shards, or None when the role is unavailable."""
    info = read_role(prepared_dir)
    if info.get("unavailable") or info["data"] is None:
        return None
    return Path(prepared_dir) if info["data"] == "." else Path(info["data"])
