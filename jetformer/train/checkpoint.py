"""Checkpoints: atomic files, the training state, and the exported model that evaluation reads.

Two files, both plain `torch.save` dicts:
  * `state.pt` — the full training state written every `train.checkpoint_every` steps (model,
    EMA, optimiser, scheduler, step, RNG states and data position of every rank, curves, sample
    grids). A run resumes from it.
  * `model.pt` — the exported model under `train.out_dir` (config dict, vocab size, number of
    classes, PCA, model and EMA weights). `load_trained` rebuilds the model from it alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from jetformer.config import Config, config_from_dict

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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then `os.replace` (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / not a torch file
        raise ValueError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise ValueError(f"{path}: not a JetFormer {what} (no 'format' key)")
    return obj


def save_state(checkpoint_dir: str | Path, state: dict) -> Path:
    """Write the training state `state` to `<checkpoint_dir>/state.pt` atomically."""
    path = Path(checkpoint_dir) / STATE_FILE
    atomic_torch_save({"format": STATE_FORMAT, **state}, path)
    return path


def load_state(checkpoint_dir: str | Path) -> dict:
    state = _load(Path(checkpoint_dir) / STATE_FILE, "training checkpoint")
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"{checkpoint_dir}: training checkpoint format {state['format']!r}, "
                         f"expected {STATE_FORMAT!r}")
    return state


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
    from jetformer.models.jetformer import JetFormer
    return JetFormer(cfg, vocab_size=vocab_size, num_classes=num_classes, pca=pca)


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
