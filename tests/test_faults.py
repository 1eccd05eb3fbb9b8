"""Faults: a truncated or corrupt newest training checkpoint (resume falls back to the previous
good one, with a warning naming both), and checkpoint writes that fail part-way (full disk,
I/O error at fsync, failed rename, interrupt, SIGKILL of the writing process): the previous
file stays byte-identical and loadable."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jetformer import safe_io
from jetformer.config import load_config
from jetformer.train import checkpoint as ckpt
from jetformer.train.launch import absolute_paths
from jetformer.train.loop import train_loop

REPO = Path(__file__).resolve().parent.parent
MICRO = ("train.steps=6", "train.checkpoint_every=3", "train.log_every=1", "train.num_workers=1",
         "train.batch_size=8", "train.val_images=8", "train.sample_prompts=1",
         "model.ema_decay=0.9")


# `project`: the micro world prepared and a tokenizer trained (conftest.py)


def micro_cfg(project: Path):
    cfg = load_config(REPO / "params.yaml", overlays=["micro"], overrides=(
        "data.prepared_dir=data/prepared", "tokenizer.out_path=models/tokenizer.model", *MICRO))
    return absolute_paths(cfg, project)


class Keep:
    """Reporter copying every checkpoint to `<dst>/checkpoint_<date>_<time>` as Ray Train v2's
    storage does."""

    def __init__(self, dst: Path):
        self.dst, self.dirs = dst, []

    def __call__(self, metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            k = len(self.dirs)
            d = self.dst / f"checkpoint_2026-12-01_09-{k:02d}-59.{999999 - k:06d}"
            shutil.copytree(checkpoint_dir, d)
            self.dirs.append(d)


@pytest.mark.parametrize("names", [
    ["checkpoint_000002", "checkpoint_000010", "checkpoint_000009", "checkpoint_000011"],
    ["checkpoint_2026-11-30_23-59-59.999999", "checkpoint_2026-12-01_21-59-22.908982",
     "checkpoint_2026-12-01_21-47-00.037468", "checkpoint_2026-12-02_00-00-00.000001"],
    ["step3", "step12", "step6", "step24"]])
def test_previous_checkpoints_newest_first(tmp_path, names):
    """Numbered (Ray Train v1), dated (Ray Train v2) and `step<N>` names; other entries of
    the run directory are not checkpoints."""
    for n in names + ["checkpoint_manager_snapshot.json", "other_000001", ".validate"]:
        (tmp_path / n).mkdir()
    newest = tmp_path / names[1]                      # the 4th name is newer: not "previous"
    expected = sorted(names[:3], key=lambda n: [int(x) for x in re.findall(r"\d+", n)],
                      reverse=True)[1:]
    assert [p.name for p in ckpt.previous_checkpoints(newest)] == expected
    assert ckpt.previous_checkpoints(tmp_path / "checkpoint_manager_snapshot.json") == []


@pytest.fixture(scope="module")
def full_run(project, tmp_path_factory):
    """An uninterrupted run: checkpoints at steps 3 and 6."""
    keep = Keep(tmp_path_factory.mktemp("full"))
    train_loop(micro_cfg(project), rank=0, world_size=1, reporter=keep)
    assert [ckpt.load_state(d)["step"] for d in keep.dirs] == [3, 6]
    return keep.dirs


def _equal_states(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert a["rank_states"][0]["data_position"] == b["rank_states"][0]["data_position"]


def _corrupt(file: Path, kind: str) -> None:
    data = file.read_bytes()
    if kind == "truncated":          # a node died mid-copy
        file.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":       # the disk filled before any byte landed
        file.write_bytes(b"")
    elif kind == "random_bytes":     # garbage of the right size
        file.write_bytes(os.urandom(len(data)))
    elif kind == "flipped_tail":     # the zip directory at the end is damaged
        file.write_bytes(data[:-64] + bytes(64))
    elif kind == "missing":          # the directory exists, the file never arrived
        file.unlink()


CORRUPTIONS = ["truncated", "zero_bytes", "random_bytes", "flipped_tail", "missing"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_newest_checkpoint_resumes_from_previous_good(project, full_run, tmp_path, kind):
    run = tmp_path / "run"
    for d in full_run:
        shutil.copytree(d, run / d.name)
    older, newest = run / full_run[0].name, run / full_run[1].name
    _corrupt(newest / ckpt.STATE_FILE, kind)
    rows = []
    keep = Keep(tmp_path / "resumed")
    with pytest.warns(UserWarning) as warned:
        train_loop(micro_cfg(project), rank=0, world_size=1, reporter=keep,
                   progress=rows.append, resume_from=str(newest))
    msg = " ".join(str(w.message) for w in warned)
    assert str(newest) in msg and str(older) in msg and "previous good checkpoint" in msg
    assert rows[0]["event"] == "start" and rows[0]["step"] == 3      # continued from step 3
    # ... and reached exactly the state of the uninterrupted run: nothing was lost
    _equal_states(ckpt.load_state(keep.dirs[-1]), ckpt.load_state(full_run[1]))
    assert ckpt.load_state(older)["step"] == 3                        # the good one is intact


def test_no_readable_checkpoint_fails_naming_the_newest(full_run, tmp_path):
    run = tmp_path / "run"
    for d in full_run:
        shutil.copytree(d, run / d.name)
        _corrupt(run / d.name / ckpt.STATE_FILE, "truncated")
    newest = run / full_run[1].name
    with (pytest.warns(UserWarning, match="unreadable too"),
          pytest.raises(ValueError, match=rf"{newest / ckpt.STATE_FILE}.*truncated")):
        ckpt.load_state_or_previous(newest)


# ----------------------------------------------------------------------------- failing writes
class _FailingFile:
    """A file that accepts `budget` bytes, then raises `error` (a disk filling up mid-write)."""

    def __init__(self, f, budget: int, error: BaseException):
        self.f, self.budget, self.error = f, budget, error

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(bytes(data[: self.budget]))
            self.budget = 0
            raise self.error
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fault(kind: str, monkeypatch):
    """Make the next atomic write fail in the way `kind` names; returns the exception type."""
    real_fdopen = os.fdopen
    if kind in ("disk_full", "interrupt"):
        error = (OSError(errno.ENOSPC, "No space left on device") if kind == "disk_full"
                 else KeyboardInterrupt())
        monkeypatch.setattr(safe_io.os, "fdopen",
                            lambda fd, mode: _FailingFile(real_fdopen(fd, mode), 5, error))
        return type(error)
    if kind == "fsync_eio":
        def fsync(fd):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(safe_io.os, "fsync", fsync)
        return OSError
    if kind == "rename_fails":
        def replace(a, b):
            raise PermissionError(errno.EACCES, "Permission denied", str(b))
        monkeypatch.setattr(safe_io.os, "replace", replace)
        return OSError
    raise AssertionError(kind)


WRITE_FAULTS = ["disk_full", "fsync_eio", "rename_fails", "interrupt"]


def _writers(tmp_path, state):
    return {
        "state": (lambda: ckpt.save_state(tmp_path, state), tmp_path / ckpt.STATE_FILE,
                  lambda: ckpt.load_state(tmp_path)),
        "model": (lambda: ckpt.export_model(state, tmp_path), tmp_path / ckpt.MODEL_FILE,
                  lambda: safe_io.safe_load(tmp_path / ckpt.MODEL_FILE)),
        "json": (lambda: safe_io.atomic_write_bytes(tmp_path / "m.json", b'{"new": 1}'),
                 tmp_path / "m.json", lambda: (tmp_path / "m.json").read_bytes()),
    }


@pytest.mark.parametrize("what", ["state", "model", "json"])
@pytest.mark.parametrize("kind", WRITE_FAULTS)
def test_failing_write_leaves_previous_file_intact(full_run, tmp_path, monkeypatch, kind, what):
    state = {k: v for k, v in ckpt.load_state(full_run[0]).items() if k != "format"}
    write, file, read = _writers(tmp_path, state)[what]
    write()                                                     # the previous good file
    before = file.read_bytes()
    state["step"] = 99
    with pytest.raises(_fault(kind, monkeypatch)):
        write()
    monkeypatch.undo()
    assert file.read_bytes() == before                          # byte-identical ...
    read()                                                      # ... and usable
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]   # no temp file left


def test_writer_killed_mid_write_leaves_previous_checkpoint_intact(full_run, tmp_path):
    """A real SIGKILL of the process while it writes `state.pt` (a slow writer, killed once
    its temp file has bytes): the previous `state.pt` is byte-identical and loads."""
    shutil.copy2(full_run[0] / ckpt.STATE_FILE, tmp_path / ckpt.STATE_FILE)
    before = (tmp_path / ckpt.STATE_FILE).read_bytes()
    child = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from jetformer.train import checkpoint as ckpt
def slow_save(obj, f):
    for _ in range(600):
        f.write(b"x" * 1024); f.flush(); time.sleep(0.01)
import torch
torch.save = slow_save
ckpt.save_state({str(tmp_path)!r}, {{"step": 99}})
"""
    proc = subprocess.Popen([sys.executable, "-c", child],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            tmps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            if tmps and tmps[0].stat().st_size > 0:
                break
            assert proc.poll() is None, "writer exited before it was killed"
            time.sleep(0.02)
        else:
            pytest.fail("the writer never started writing")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / ckpt.STATE_FILE).read_bytes() == before
    assert ckpt.load_state(tmp_path)["step"] == 3


def test_failing_checkpoint_write_during_training_keeps_previous_and_resumes(project, full_run,
                                                                             tmp_path,
                                                                             monkeypatch):
    """The disk fills at the second checkpoint: training stops with the OSError, the first
    checkpoint is intact, and resuming from it reaches the uninterrupted run's state."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    keep = Keep(tmp_path / "run")
    with pytest.raises(OSError, match="No space left"):
        train_loop(micro_cfg(project), rank=0, world_size=1, reporter=keep)
    monkeypatch.undo()
    assert len(keep.dirs) == 1 and ckpt.load_state(keep.dirs[0])["step"] == 3
    resumed = Keep(tmp_path / "resumed")
    train_loop(micro_cfg(project), rank=0, world_size=1, reporter=resumed,
               resume_from=str(keep.dirs[0]))
    _equal_states(ckpt.load_state(resumed.dirs[-1]), ckpt.load_state(full_run[1]))
