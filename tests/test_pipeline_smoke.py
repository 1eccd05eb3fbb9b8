"""`make repro` and the README's experiment workflow in miniature, on the committed repo (HEAD)
copied to a temp dir with params.yaml + experiments/presets/micro.yaml, the venv linked in as
`.venv` (what `make install` leaves) and nothing of it on PATH:

  * `dvc repro` whose training gets SIGTERM after its first checkpoint: the stage fails, the
    MLflow run is KILLED; the next `dvc repro` resumes it and completes every stage; every
    declared output exists; a third `dvc repro` does nothing;
  * changing `data.workers` or `mlflow.tracking_uri` leaves every stage up to date;
  * the README's `dvc exp run --queue` lines (values scaled to the micro budget) and
    `--run-all`, in the activated venv as the README says: each experiment has its own
    training and evaluation runs in the repository's MLflow store and its own Ray checkpoint;
    `dvc exp show` lists both with their metrics;
  * the README's evaluation-only `.venv/bin/dvc exp run` line, nothing on PATH: a new
    evaluation run nested under the baseline's training run, whose metrics stay as they were.
Runs in `make test`, so a broken pipeline or workflow cannot pass the suite."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jetformer.config import load_config_dict

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VENV = BIN.parent
# the baseline trains long enough to be stopped between its first checkpoint and its end
BASELINE = {"train.steps": 200, "train.checkpoint_every": 40, "train.log_every": 20}
# values for the README's `dvc exp run` lines (same keys, micro budget)
README_VALUES = {"train.noise.sigma0": ["4", "8"], "train.steps": ["8", "8"],
                 "eval.num_samples": ["8"]}
pytestmark = pytest.mark.slow


def _copy_committed_repo(dst: Path) -> None:
    """HEAD's tree (not the work tree: half-made edits of a shared checkout stay out)."""
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def _env() -> dict:
    """The user's environment minus anything that would route around the repository's own
    set-up: no venv on PATH, no PYTHONPATH, no tracking server."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH", "VIRTUAL_ENV",
                        "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")}
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() != BIN.resolve()]
    env.update(PATH=os.pathsep.join(path), DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return env


def _dvc(args, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _git(repo: Path, env: dict, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def _training_pid(repo: Path) -> int | None:
    """The pid of the `pipelines/train.py` process running in `repo` (this test's own)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1] == b"pipelines/train.py" \
                    and Path(os.readlink(proc / "cwd")) == repo.resolve():
                return int(proc.name)
        except OSError:
            continue
    return None


def _registered_checkpoint(repo: Path) -> bool:
    """Whether Ray has registered a checkpoint of the training (its snapshot names one: a
    checkpoint on disk but not yet registered is not resumed from)."""
    for snap in (repo / ".ray_runs").glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):
            pass                                        # being written
    return False


def _repro_with_sigterm(repo: Path, env: dict) -> dict:
    """`dvc repro`; SIGTERM to the training once a checkpoint is registered."""
    proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, sent = time.time() + 900, None
    try:
        while proc.poll() is None and time.time() < deadline:
            if not sent and _registered_checkpoint(repo):
                pid = _training_pid(repo)
                if pid:
                    os.kill(pid, signal.SIGTERM)
                    sent = time.time()
            time.sleep(0.05)
        out = proc.communicate(timeout=max(1, deadline - time.time()))[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent, f"the training never reached a checkpoint:\n{out[-6000:]}"
    return {"rc": proc.returncode, "out": out}


def _runs(repo: Path) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("jetformer")
    return client.search_runs([exp.experiment_id], max_results=1000)


def _readme_exp_lines() -> list[str]:
    """The README's `dvc exp run` command lines, comments stripped."""
    text = (REPO / "README.md").read_text()
    return [line.split("#")[0].strip() for line in text.splitlines()
            if line.startswith((".venv/bin/dvc exp run", "dvc exp run"))]


def _with_values(line: str, k: int) -> list[str]:
    """`line` as argv, each `-S key=value` value replaced by the k-th README_VALUES entry."""
    argv = line.split()
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "-S":
            key = arg.split("=", 1)[0]
            assert key in README_VALUES, f"README's `{line}` sets {key}: give it a micro value"
            argv[i] = f"{key}={README_VALUES[key][k]}"
    return argv


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The micro repo after a SIGTERMed and a resumed `dvc repro`, committed as baseline."""
    repo = tmp_path_factory.mktemp("smoke") / "repo"
    _copy_committed_repo(repo)
    assert (repo / ".dvc").is_dir() and (repo / "dvc.yaml").is_file()
    merged = load_config_dict(repo / "params.yaml",
                              overlays=[repo / "experiments/presets/micro.yaml"],
                              overrides=[f"{k}={v}" for k, v in BASELINE.items()])
    (repo / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    (repo / ".venv").symlink_to(VENV)                       # what `make install` leaves
    env = _env()
    _git(repo, env, "init", "-q")
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "micro")

    t0 = time.time()
    killed = _repro_with_sigterm(repo, env)
    killed_runs = {r.info.run_id: r.info.status for r in _runs(repo)}
    resumed = _dvc(["repro"], repo, env, timeout=1200)
    _ok(resumed, "dvc repro after SIGTERM")
    repro_s = time.time() - t0
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "baseline")
    return {"repo": repo, "env": env, "killed": killed, "killed_runs": killed_runs,
            "resumed": resumed.stdout, "repro_s": repro_s}


def test_sigterm_marks_the_run_killed_and_repro_resumes(pipeline):
    killed = pipeline["killed"]
    assert killed["rc"] != 0, killed["out"][-3000:]
    assert "train: terminated (SIGTERM)" in killed["out"], killed["out"][-3000:]
    assert list(pipeline["killed_runs"].values()) == ["KILLED"], pipeline["killed_runs"]
    resumed = re.search(r"train: \d+ worker\(s\) on \w+, resuming at step (\d+)",
                        pipeline["resumed"])
    assert resumed, pipeline["resumed"][-3000:]
    assert BASELINE["train.checkpoint_every"] <= int(resumed[1]) < BASELINE["train.steps"]
    train = json.loads((pipeline["repo"] / "metrics/train.json").read_text())
    run_id = train["mlflow_run_id"]
    assert run_id in pipeline["killed_runs"]                          # the same run, resumed
    status = {r.info.run_id: r.info.status for r in _runs(pipeline["repo"])}
    assert status[run_id] == "FINISHED"


def test_micro_dvc_repro_produces_every_output_and_is_idempotent(pipeline):
    repo, env = pipeline["repo"], pipeline["env"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    stages = _ok(_dvc(["stage", "list", "--name-only"], repo, env, 120), "dvc stage list").split()
    assert {"prepare@pretrain", "tokenizer", "train", "eval_report"} <= set(stages) == set(lock)
    missing = [(s, o["path"]) for s, st in lock.items() for o in st.get("outs", [])
               if not (repo / o["path"]).exists()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}"

    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["steps"] == BASELINE["train.steps"]
    for key in ("train_bits_per_dim", "val_bits_per_dim"):
        assert math.isfinite(train[key]) and 0 < train[key] < 16, (key, train[key])
    rows = (repo / "plots/train.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) > 1
    assert list((repo / "plots/train_samples").glob("*.png"))
    assert sorted(p.name for p in (repo / "models/checkpoint").iterdir()) == ["model.pt"]
    for path in sorted((repo / "metrics").glob("*.json")):            # flat: one column each
        nested = {k: v for k, v in json.loads(path.read_text()).items()
                  if isinstance(v, (dict, list))}
        assert not nested, f"{path.name} holds lists/dicts: {sorted(nested)}"
    report = json.loads((repo / "metrics/eval.json").read_text())
    assert report["mlflow_run_id"] and set(report) - {"mlflow_run_id"} and \
        all(k.startswith("beats_") for k in set(report) - {"mlflow_run_id"})
    runs = {r.info.run_id: r for r in _runs(repo)}
    ev = runs[report["mlflow_run_id"]]
    assert ev.data.tags["mlflow.parentRunId"] == train["mlflow_run_id"]
    assert ev.data.tags["jetformer.role"] == "eval" and "fid" in ev.data.metrics
    tr = runs[train["mlflow_run_id"]]
    head = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert tr.data.tags["mlflow.source.git.commit"] == head
    assert tr.data.tags["mlflow.source.name"] == "dvc:train"
    plots = _dvc(["plots", "show", "--json"], repo, env, timeout=300)       # every plot loads
    assert plots.returncode == 0 and not json.loads(plots.stdout).get("errors"), \
        plots.stdout[-3000:]

    t0 = time.time()
    second = _ok(_dvc(["repro"], repo, env, timeout=300), "no-op dvc repro")
    second_s = time.time() - t0
    assert "Running stage" not in second, f"second dvc repro re-ran stages:\n{second}"
    assert second_s < 60, f"a no-op dvc repro took {second_s:.0f}s"
    print(f"micro dvc repro (SIGTERM + resume): {pipeline['repro_s']:.0f}s, "
          f"no-op repro {second_s:.1f}s")


@pytest.mark.parametrize("key,value", [("data.workers", 3),
                                       ("mlflow.tracking_uri", "sqlite:////elsewhere/m.db")])
def test_speed_knobs_and_tracking_uri_rerun_no_stage(pipeline, key, value):
    repo, env = pipeline["repo"], pipeline["env"]
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    section, name = key.split(".")
    params[section][name] = value
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        status = _ok(_dvc(["status", "--json"], repo, env, 120), "dvc status")
        assert json.loads(status) == {}, f"{key}={value} changed stages: {status}"
    finally:
        params_file.write_text(original)


def test_queued_readme_experiments_get_their_own_runs_and_checkpoints(pipeline):
    repo, env = pipeline["repo"], pipeline["env"]
    lines = _readme_exp_lines()
    queued = [line for line in lines if "--queue" in line]
    assert len(queued) == 2 and "dvc exp run --run-all" in lines, lines
    activated = {**env, "VIRTUAL_ENV": str(repo / ".venv"),            # `. .venv/bin/activate`
                 "PATH": f"{repo / '.venv/bin'}{os.pathsep}{env['PATH']}"}
    before = {r.info.run_id for r in _runs(repo)}
    for k, line in enumerate([*queued, "dvc exp run --run-all"]):
        argv = _with_values(line, k)
        _ok(subprocess.run(argv, cwd=repo, env=activated, capture_output=True, text=True,
                           timeout=1500), " ".join(argv))

    new = [r for r in _runs(repo) if r.info.run_id not in before]
    names = {r.data.tags.get("dvc.exp_name") for r in new}
    assert len(names) == 2 and "" not in names and None not in names, names
    show = json.loads(_ok(_dvc(["exp", "show", "--json"], repo, env, 300), "dvc exp show"))
    shown = _experiments(show)
    for name in names:
        trains = [r for r in new if r.data.tags.get("dvc.exp_name") == name
                  and r.data.tags.get("jetformer.role") == "train"]
        evals = [r for r in new if r.data.tags.get("dvc.exp_name") == name
                 and r.data.tags.get("jetformer.role") == "eval"]
        assert len(trains) == 1 and len(evals) == 1, (name, [r.info.run_name for r in new])
        tr, ev = trains[0], evals[0]
        assert tr.info.status == ev.info.status == "FINISHED"
        assert ev.data.tags["mlflow.parentRunId"] == tr.info.run_id
        assert ev.data.tags["dvc.baseline_rev"] == tr.data.tags["dvc.baseline_rev"]
        assert "fid" in ev.data.metrics and "final_val_bits_per_dim" in tr.data.metrics
        run_dir = repo / ".ray_runs" / tr.info.run_name                 # in the repository
        final = json.loads((run_dir / "final.json").read_text())
        assert (Path(final["checkpoint"]) / "state.pt").is_file()
        assert name in shown, (name, sorted(shown))
        metrics = shown[name]
        assert metrics["metrics/train.json"]["mlflow_run_id"] == tr.info.run_id
        assert metrics["metrics/train.json"]["steps"] == int(README_VALUES["train.steps"][0])
        assert metrics["metrics/eval.json"]["mlflow_run_id"] == ev.info.run_id
        assert math.isfinite(metrics["metrics/generation.json"]["fid"])


def _experiments(show: list) -> dict[str, dict]:
    """{experiment name: its metrics by file} from `dvc exp show --json`."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if node.get("name") and isinstance(data, dict) and "metrics" in data:
                found[node["name"]] = {f: m.get("data", {}) for f, m in data["metrics"].items()}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(show)
    return found


def test_readme_evaluation_only_experiment_leaves_the_training_run_alone(pipeline):
    repo, env = pipeline["repo"], pipeline["env"]
    line = next(ln for ln in _readme_exp_lines() if "eval.num_samples" in ln)
    train = json.loads((repo / "metrics/train.json").read_text())
    old_eval = json.loads((repo / "metrics/eval.json").read_text())["mlflow_run_id"]
    runs = {r.info.run_id: r for r in _runs(repo)}
    train_metrics = dict(runs[train["mlflow_run_id"]].data.metrics)
    old_eval_metrics = dict(runs[old_eval].data.metrics)
    argv = _with_values(line, 0)
    proc = subprocess.run([str(repo / argv[0]), *argv[1:]], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    out = _ok(proc, " ".join(argv)) + proc.stderr
    assert "Running stage 'train'" not in out and "Running stage 'sample'" in out, out[-3000:]

    runs = {r.info.run_id: r for r in _runs(repo)}
    assert dict(runs[train["mlflow_run_id"]].data.metrics) == train_metrics
    assert dict(runs[old_eval].data.metrics) == old_eval_metrics
    new_eval = json.loads((repo / "metrics/eval.json").read_text())["mlflow_run_id"]
    ev = runs[new_eval]
    assert new_eval != old_eval and ev.data.tags["mlflow.parentRunId"] == train["mlflow_run_id"]
    assert ev.data.tags["dvc.exp_name"] and ev.data.metrics["t2i_num_samples"] == 8
    assert runs[old_eval].data.metrics["t2i_num_samples"] != 8
