"""The shared stage runner (`jetformer.stage.run_stage`) behind every pipelines/*.py script, and
the public `ArrowImageDataset.column` accessor the evaluation stages read baselines through."""
import pytest
import yaml

from jetformer.config import REPO_ROOT, load_config
from jetformer.data.dataset import ArrowImageDataset
from jetformer.data.prepare import prepare
from jetformer.stage import StageError, run_stage


def test_bad_params_fail_before_the_stage_runs(tmp_path, capsys):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["eval"]["batch_size"] = 0
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    called = []
    assert run_stage("judge", lambda cfg, **kw: called.append(kw), argv=["--params", str(bad)],
                     out="models/judge.pt") == 1
    assert called == []                                           # no compute on bad params
    err = capsys.readouterr().err.strip()
    assert err.startswith("judge failed: ") and "eval.batch_size" in err and "\n" not in err


@pytest.mark.parametrize("error", [FileNotFoundError("x.pt not found"), ValueError("bad value"),
                                   StageError("no samples")])
def test_stage_errors_become_one_line_and_status_1(error, capsys):
    def fail(cfg, task, out_dir):
        raise error
    rc = run_stage("finetune {task}", fail, argv=["vqa"], positional={"task": ("caption", "vqa")},
                   out_dir=None)
    assert rc == 1
    assert capsys.readouterr().err == f"finetune vqa failed: {error}\n"


def test_paths_reach_the_stage_and_success_is_0():
    seen = {}

    def stage(cfg, metrics_dir, out):
        seen.update(cfg=cfg, metrics_dir=metrics_dir, out=out)
    assert run_stage("eval_report", stage,
                     argv=["--metrics-dir", "m", "--params", str(REPO_ROOT / "params.yaml")],
                     metrics_dir="metrics", out="metrics/eval.json") == 0
    assert seen["metrics_dir"] == "m" and seen["out"] == "metrics/eval.json"
    assert seen["cfg"] == load_config(REPO_ROOT / "params.yaml")


def test_other_errors_are_not_swallowed():
    def bug(cfg):
        raise KeyError("a bug, not bad input")
    with pytest.raises(KeyError):
        run_stage("x", bug, argv=["--params", str(REPO_ROOT / "params.yaml")])


def test_column_matches_items_across_shards_and_worker_parts(tmp_path):
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=(
        f"data.synthetic.out_dir={tmp_path / 'raw'}", f"data.prepared_dir={tmp_path / 'prepared'}",
        "data.synthetic.num_train=11", "data.synthetic.num_val=2", "data.synthetic.bad_files=false",
        "data.resolution=8", "data.workers=1", "data.shard_size=4"))
    prepare(cfg)
    for rank, world_size in ((0, 1), (1, 3)):
        ds = ArrowImageDataset(cfg.data.prepared_dir, "train", rank=rank, world_size=world_size)
        assert len(ds.paths) > 1
        for name in ("captions", "qa", "id"):
            assert ds.column(name) == [ds[i][name] for i in range(len(ds))]
    with pytest.raises(ValueError, match="no column 'nope'"):
        ds.column("nope")


def test_sigterm_unwinds_the_stage_and_exits_143(capsys):
    import os
    import signal

    cleaned = []

    def stage(cfg):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the stage")
        finally:
            cleaned.append(True)                   # `finally` blocks run, as on Ctrl-C
    before = signal.getsignal(signal.SIGTERM)
    assert run_stage("train", stage, argv=["--params", str(REPO_ROOT / "params.yaml")]) == 143
    assert cleaned == [True]
    assert "train: terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before         # the handler is scoped


def test_metrics_files_hold_flat_scalars(tmp_path):
    import json
    import math

    from jetformer.stage import write_metrics
    written = write_metrics(tmp_path / "m.json", {
        "fid": 1.5, "ok": True, "name": "domain", "nan": math.nan,
        "per_type": {"yes/no": 0.5, "number": {"small": 0.25}}, "prompts": [["a", "b"]]})
    assert json.loads((tmp_path / "m.json").read_text()) == written == {
        "fid": 1.5, "ok": True, "name": "domain", "nan": None,
        "per_type_yes/no": 0.5, "per_type_number_small": 0.25}


def test_progress_prints_a_line_every_tenth_when_not_a_terminal():
    import io

    from jetformer.progress import progress
    buf = io.StringIO()
    assert list(progress(range(0, 50, 2), "decode", file=buf, delay=0)) == list(range(0, 50, 2))
    lines = buf.getvalue().splitlines()
    done = [int(ln.split("(")[1].split("/")[0]) for ln in lines]
    assert done == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25], lines   # 25 items: one line per tenth
    assert lines[-1].startswith("decode: 100% (25/25) ") and "ETA 0s" in lines[-1]
    quiet = io.StringIO()                             # a loop shorter than `delay`: silent
    assert list(progress([1, 2, 3], "x", file=quiet, delay=60)) == [1, 2, 3]
    assert quiet.getvalue() == ""
    assert list(progress(iter([1, 2]), "no length", file=quiet, delay=0)) == [1, 2]


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path):
    """`safe_io.atomic_write` (behind write_metrics and every other output): a writer that fails
    half way leaves the previous file and no temp file; a new file gets open()'s usual mode."""
    import json
    import os

    from jetformer.safe_io import atomic_write
    from jetformer.stage import write_metrics

    path = tmp_path / "metrics" / "m.json"
    write_metrics(path, {"a": 1.5, "b": {"c": 2}})
    assert json.loads(path.read_text()) == {"a": 1.5, "b_c": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    def half(f):
        f.write(b"{\"a\": ")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"a": 1.5, "b_c": 2}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
