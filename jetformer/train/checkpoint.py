"""Checkpoints: atomic files, the training state, and the exported model that evaluation reads.

Two files, both `torch.save` dicts of plain data only (tensors, numbers, strings, bytes, lists,
dicts: the config as a dict, RNG states as tensors), read back with `weights_only=True`
(`jetformer.safe_io`), so opening a checkpoint from someone else never runs code from it:
  * `state.pt` — the full training state written every `train.checkpoint_every` steps (model,
    EMA, optimiser, scheduler, step, RNG states and data position of every rank, curves, sample
    grids). A run resumes from it.
  * `model.pt` — the exported model under `train.out_dir` (config dict, vocab size, number of
    classes, PCA, model and EMA weights). `load_trained` rebuilds the model from it alone.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from jetformer.config import Config, config_from_dict
from jetformer.safe_io import atomic_torch_save, atomic_write_bytes, safe_load  # noqa: F401

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
STATE_FORMAT = "jetformer-train-state-v1"
MODEL_FORMAT = "jetformer-model-v1"


# keys that change how a run is operated or monitored, not the weights it computes: excluded
# from its identity (dvc.yaml leaves them out of the train stage's params too)
OPERATIONAL_KEYS = ("train.log_every", "train.checkpoint_every", "train.ray_address",
                    "train.max_failures", "train.storage_dir", "train.out_dir",
                    "train.val_images", "train.sample_every", "train.sample_prompts",
                    "train.sample_cfg_scale", "train.sample_temperature", "data.workers")
TRAINING_SECTIONS = ("seed", "data", "tokenizer", "pca", "model", "train")


def training_hash(cfg: Config, extra: str = "", n: int = 12) -> str:
    """Identity of a training run: a hash of every parameter that changes its result (plus
    `extra`, e.g. a fingerprint of the prepared data). Ray runs are named by it, so a changed
    config starts a new run and never silently resumes an old one."""
    flat = {k: v for k, v in cfg.flat().items()
            if k.split(".")[0] in TRAINING_SECTIONS and k not in OPERATIONAL_KEYS}
    blob = json.dumps(flat, sort_keys=True) + extra
    return hashlib.sha1(blob.encode()).hexdigest()[:n]


def _load(path: Path, what: str) -> dict:
    obj = safe_load(path, what)
    if not isinstance(obj, dict) or "format" not in obj:
        raise ValueError(f"{path}: not a JetFormer {what} (no 'format' key)")
    return obj


def save_state(checkpoint_dir: str | Path, state: dict) -> Path:
    """Write the training state `state` to `<checkpoint_dir>/state.pt` atomically."""
    path = Path(checkpoint_dir) / STATE_FILE
    atomic_torch_save({"format": STATE_FORMAT, **state}, path)
    return path


def load_state(checkpoint_dir: str | Path) -> dict:
    """The training state in `<checkpoint_dir>/state.pt`; ValueError (one line, naming the
    file) if it is truncated, corrupt, unsafe or of another format."""
    state = _load(Path(checkpoint_dir) / STATE_FILE, "training checkpoint")
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"{checkpoint_dir}: training checkpoint format {state['format']!r}, "
                         f"expected {STATE_FORMAT!r}")
    return state


def _checkpoint_order(name: str) -> tuple[str, tuple[int, ...]] | None:
    """("checkpoint_", numbers) for numbered or dated names (`checkpoint_000007`, Ray Train
    v2's `checkpoint_2026-12-01_21-59-22.908982`, `step3`); None for other names."""
    m = re.fullmatch(r"(\D*)(\d[\d._-]*)", name)
    if m is None:
        return None
    return m.group(1), tuple(int(x) for x in re.findall(r"\d+", m.group(2)))


def previous_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Older siblings of a numbered or dated checkpoint directory, newest first: for
    `checkpoint_000007` the existing `checkpoint_000006`, `checkpoint_000005`, ...; for Ray
    Train v2's `checkpoint_<date>_<time>` the earlier dates."""
    d = Path(checkpoint_dir)
    mine = _checkpoint_order(d.name)
    if mine is None or not d.parent.is_dir():
        return []
    older = []
    for p in d.parent.iterdir():
        order = _checkpoint_order(p.name)
        if order is not None and order[0] == mine[0] and order[1] < mine[1] and p.is_dir():
            older.append((order[1], p))
    return [p for _, p in sorted(older, reverse=True)]


def load_state_or_previous(checkpoint_dir: str | Path) -> tuple[dict, Path]:
    """`load_state`, falling back to the newest readable older checkpoint (see
    `previous_checkpoints`) when the newest is truncated or corrupt (a node died mid-write, a
    disk filled), with a warning naming both. Returns (state, the directory it came from);
    raises the newest one's error when no older checkpoint is readable either."""
    try:
        return load_state(checkpoint_dir), Path(checkpoint_dir)
    except (ValueError, FileNotFoundError) as newest_error:
        for prev in previous_checkpoints(checkpoint_dir):
            try:
                state = load_state(prev)
            except (ValueError, FileNotFoundError) as e:
                warnings.warn(f"resume: older checkpoint {prev} is unreadable too ({e})",
                              stacklevel=2)
                continue
            warnings.warn(f"resume: the newest checkpoint {checkpoint_dir} is unreadable "
                          f"({newest_error}); resuming from the previous good checkpoint {prev} "
                          f"(step {state['step']}) instead", stacklevel=2)
            return state, prev
        raise newest_error from None


def export_model(state: dict, out_dir: str | Path) -> Path:
    """Write `<out_dir>/model.pt` (what `load_trained` reads) from a training state."""
    path = Path(out_dir) / MODEL_FILE
    atomic_torch_save({"format": MODEL_FORMAT, "config": state["config"],
                       "vocab_size": state["vocab_size"], "num_classes": state["num_classes"],
                       "pca": state.get("pca"), "step": state["step"],
                       "model": state["model"], "ema": state.get("ema")}, path)
    return path


def model_file(path: str | Path) -> Path:
    """`path` may be the exported file, its directory, or a training checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, STATE_FILE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {MODEL_FILE} or {STATE_FILE} in {path} (train first: "
                                "dvc repro train)")
    return path


def build_model(cfg: Config, vocab_size: int, num_classes: int, pca: dict | None):
    """The JetFormer of `cfg` (`JetFormer.from_config`) with the data-dependent sizes."""
    from jetformer.models.jetformer import JetFormer
    return JetFormer.from_config(cfg, vocab_size=vocab_size, num_classes=num_classes, pca=pca)


def load_trained(path: str | Path, device: str | torch.device | None = None
                 ) -> tuple[torch.nn.Module, Config]:
    """The trained model (EMA weights when the run kept an EMA) in eval mode, and its Config.

    `path`: `models/checkpoint`, its `model.pt`, or a training checkpoint directory."""
    file = model_file(path)
    obj = _load(file, "model checkpoint")
    if obj["format"] not in (MODEL_FORMAT, STATE_FORMAT):
        raise ValueError(f"{file}: unknown checkpoint format {obj['format']!r}")
    cfg = config_from_dict(obj["config"])
    model = build_model(cfg, obj["vocab_size"], obj["num_classes"], obj.get("pca"))
    model.load_state_dict(obj["model"])
    if obj.get("ema") is not None:
        from jetformer.models.ema import EMA
        ema = EMA(model, cfg.model.ema_decay)
        ema.load_state_dict(obj["ema"])
        ema.copy_to(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------- RNG states
def numpy_rng_state() -> dict:
    """`np.random.get_state()` as plain data (the MT19937 key as an int64 tensor)."""
    import numpy as np
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(s) -> None:
    """Inverse of `numpy_rng_state` (also takes the legacy tuple of a converted checkpoint)."""
    import numpy as np
    if isinstance(s, dict):
        keys = np.asarray(s["keys"].numpy() if torch.is_tensor(s["keys"]) else s["keys"])
        s = (s["bit_generator"], keys.astype(np.uint32), s["pos"], s["has_gauss"],
             s["cached_gaussian"])
    np.random.set_state(s)


# ----------------------------------------------------------------------------- conversion
def _to_plain(obj):
    """Legacy checkpoint contents -> plain data: numpy arrays -> tensors, numpy scalars ->
    numbers, numpy RNG state tuples -> `numpy_rng_state` dicts, dataclasses -> dicts."""
    import collections
    import dataclasses

    import numpy as np
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        out = {k: _to_plain(v) for k, v in obj.items()}
        return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
    if (isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "MT19937"
            and isinstance(obj[1], np.ndarray)):
        return {"bit_generator": "MT19937", "keys": torch.from_numpy(obj[1].astype(np.int64)),
                "pos": int(obj[2]), "has_gauss": int(obj[3]), "cached_gaussian": float(obj[4])}
    if isinstance(obj, tuple):
        return tuple(_to_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def _numpy_rng_globals() -> list:
    """The only non-plain objects old checkpoints held: numpy arrays (`np.random.get_state()`),
    allowed by name for `weights_only` loading under numpy 1 and 2 module paths."""
    core = getattr(np, "_core", None) or np.core
    named = [(getattr(core.multiarray, f), f"numpy.{m}.multiarray.{f}")
             for f in ("_reconstruct", "scalar") for m in ("core", "_core")]
    dtypes = [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFDG"]
    return [np.ndarray, np.dtype, *dtypes, *named]


def convert_legacy(path: str | Path) -> Path:
    """Rewrite a checkpoint saved before checkpoints were plain data so that plain `weights_only`
    loading reads it. The old file is read with `weights_only=True` plus the numpy array types of
    its RNG state (`_numpy_rng_globals`), so converting never runs code from it either. The
    original is kept beside it as `<name>.unsafe-backup`. Returns the file."""
    import shutil
    file = model_file(path)
    try:
        safe_load(file, "checkpoint")
        print(f"{file}: already plain data; nothing to convert")
        return file
    except ValueError:
        pass
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        obj = torch.load(file, map_location="cpu", weights_only=True)
    plain = _to_plain(obj)
    backup = file.with_name(file.name + ".unsafe-backup")
    shutil.copy2(file, backup)
    atomic_torch_save(plain, file)
    safe_load(file, "converted checkpoint")
    print(f"{file}: converted to plain data (original kept as {backup})")
    return file


def main(argv: list[str] | None = None) -> int:
    """`python -m jetformer.train.checkpoint convert PATH...` (see `convert_legacy`)."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m jetformer.train.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert",
                       help="rewrite old (pickled numpy RNG state) checkpoints as plain data")
    p.add_argument("paths", nargs="+", help="model.pt / state.pt or their directories")
    args = parser.parse_args(argv)
    try:
        for path in args.paths:
            convert_legacy(path)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
