"""Files that never run code: atomic writes, and `torch.load` restricted to plain data.

Every file the project writes goes through `atomic_write` (text, JSON, PNG, figures, torch
files): a temp file beside the target, fsync, `os.replace`, so a reader never sees half a file.

Everything the project saves with `torch` (training state, exported model, PCA, evaluation
samples) holds only tensors, numbers, strings, bytes, None, lists, tuples and dicts;
`atomic_torch_save` refuses anything else, and `safe_load` reads with `weights_only=True`, so a
file that would build another object when unpickled (the classic `__reduce__` payload) is
refused before any of its code runs.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

PLAIN_SCALARS = (int, float, bool, str, bytes, type(None))   # and torch.dtype, torch.device
CONVERT_HINT = ("if it is a JetFormer checkpoint written before checkpoints were plain data "
                "and you trust its origin, convert it once with `python -m "
                "jetformer.train.checkpoint convert {path}`")


class UnsafeFileError(ValueError):
    """A file needs code execution to load (or is not a torch file at all)."""


def check_plain(obj, where: str = "") -> None:
    """Raise TypeError naming the first value that `weights_only` loading could not read."""
    import torch      # here, not at the top: the stages that write no torch file never load it
    if torch.is_tensor(obj) or isinstance(obj, PLAIN_SCALARS + (torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where or '<root>'}: key {k!r} is not a string or integer")
            check_plain(v, f"{where}.{k}" if where else str(k))
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where or '<root>'}: {type(obj).__module__}.{type(obj).__qualname__} is "
                    "not plain data (tensors, numbers, strings, bytes, lists, dicts)")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    """The mode `open()` gives a new file (0o666 less the umask); mkstemp's is 0o600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_mode()


def atomic_write(path: str | Path, write) -> None:
    """`write(binary file object)` into a temp file beside `path`, fsync, then `os.replace`: a
    crash, a full disk or an exception at any point leaves the previous `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (never a half file)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8 at `path`, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, *, indent: int = 2, ensure_ascii: bool = True,
                      sort_keys: bool = False) -> None:
    """`obj` as indented JSON (and a final newline) at `path`, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii,
                                       sort_keys=sort_keys) + "\n")


def atomic_save_png(array, path: str | Path) -> None:
    """A uint8 [H, W, 3] array as a PNG at `path`, atomically."""
    from PIL import Image
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def atomic_save_figure(fig, path: str | Path, **savefig) -> None:
    """A matplotlib figure as a PNG at `path` (`savefig` keywords: dpi, bbox_inches), atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig))


def atomic_torch_save(obj, path: str | Path) -> None:
    """`torch.save` of plain data (checked first, see `check_plain`) to `path`, atomically."""
    import torch
    check_plain(obj)
    atomic_write(path, lambda f: torch.save(obj, f))


def _one_line(e: BaseException) -> str:
    """The first sentence of an error message (torch's are paragraphs)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return re.split(r"(?<=\.) ", text, maxsplit=1)[0][:200]


def safe_load(path: str | Path, what: str = "file"):
    """`torch.load(path, weights_only=True)` on CPU, with one-line errors naming the file:
    FileNotFoundError if missing, UnsafeFileError if loading it would execute code (nothing
    of it runs), ValueError if it is truncated or not a torch file."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():   # (torch warns about the pickle protocol of odd files)
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if m:
            raise UnsafeFileError(f"{path}: refused to load {what}: unpickling it would call "
                                  f"{m.group(1)}, code from the file; "
                                  + CONVERT_HINT.format(path=path)) from None
        m = re.search(r"Unsupported operand (\d+)", text)
        if m:
            raise UnsafeFileError(f"{path}: refused to load {what}: not a file written by "
                                  f"torch.save (pickle opcode {m.group(1)} is not allowed)"
                                  ) from None
        raise UnsafeFileError(f"{path}: refused to load {what}: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 (truncated zip, random bytes, empty file, ...)
        raise ValueError(f"{path}: cannot read {what} (corrupt or truncated: "
                         f"{type(e).__name__}: {_one_line(e)})") from None
