"""`make repro` in miniature: the committed repo (HEAD) copied to a temp dir, params.yaml +
experiments/presets/micro.yaml, `dvc repro` with the venv's dvc. Every declared output of every
stage in dvc.yaml must exist afterwards, and a second `dvc repro` must do nothing. Runs in
`make test`, so a broken pipeline cannot pass the suite."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jetformer.config import load_config_dict

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _copy_committed_repo(dst: Path) -> None:
    """HEAD's tree (not the work tree: half-made edits of a shared checkout stay out)."""
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def _declared_outputs(dvc_yaml: dict) -> dict[str, list[str]]:
    """stage -> paths of its outs, metrics and plots."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        paths = []
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
        out[name] = paths
    return out


def _dvc(args, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_micro_dvc_repro_produces_every_output_and_is_idempotent(tmp_path):
    repo = tmp_path / "repo"
    _copy_committed_repo(repo)
    assert (repo / ".dvc").is_dir() and (repo / "dvc.yaml").is_file()
    merged = load_config_dict(repo / "params.yaml", overlays=[repo / "experiments/presets/micro.yaml"])
    (repo / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(repo),   # the copy's code
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    t0 = time.time()
    first = _dvc(["repro"], repo, env, timeout=1200)
    assert first.returncode == 0, f"dvc repro failed:\n{first.stdout[-6000:]}\n{first.stderr[-6000:]}"
    first_s = time.time() - t0

    stages = _declared_outputs(yaml.safe_load((repo / "dvc.yaml").read_text()))
    assert {"prepare", "tokenizer", "train"} <= set(stages)
    missing = [(s, p) for s, paths in stages.items() for p in paths if not (repo / p).exists()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}"

    # the train stage's outputs are sane
    micro = yaml.safe_load((repo / "experiments/presets/micro.yaml").read_text())
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["steps"] == micro["train"]["steps"]
    for key in ("train_bits_per_dim", "val_bits_per_dim"):
        assert math.isfinite(train[key]) and 0 < train[key] < 16, (key, train[key])
    rows = (repo / "plots/train.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) > 1
    assert list((repo / "plots/train_samples").glob("*.png"))
    run = json.loads((repo / "models/checkpoint/mlflow_run.json").read_text())
    assert run["tracking_uri"] == f"sqlite:///{repo / 'mlflow.db'}"          # inside the copy
    assert (repo / "dvc.lock").is_file()
    plots = _dvc(["plots", "show", "--json"], repo, env, timeout=300)       # every plot loads
    assert plots.returncode == 0 and not json.loads(plots.stdout).get("errors"), plots.stdout[-3000:]

    t0 = time.time()
    second = _dvc(["repro"], repo, env, timeout=300)
    second_s = time.time() - t0
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout, f"second dvc repro re-ran stages:\n{second.stdout}"
    assert second_s < 60, f"a no-op dvc repro took {second_s:.0f}s"
    status = _dvc(["status"], repo, env, timeout=120)
    assert "up to date" in status.stdout.lower(), status.stdout
    print(f"micro dvc repro: {first_s:.0f}s, no-op repro {second_s:.1f}s")
