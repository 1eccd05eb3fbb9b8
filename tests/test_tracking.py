"""MLflow tracking of the pipeline (`jetformer.train.tracking`, `jetformer.eval.report`,
`jetformer.compare`): where the store lives inside `dvc exp run` copies, one nested evaluation
run per evaluation tagged with its DVC experiment, and selecting runs by those tags."""
import csv

import pytest

from jetformer.config import REPO_ROOT, load_config
from jetformer.train import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A repository `parent` (DVC_ROOT) and a temp copy `copy` of it as the cwd, as in
    `dvc exp run --temp`; mlflow.tracking_uri unset."""
    parent, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    for d in (parent, copy):
        (d / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(parent))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-one")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    monkeypatch.setenv("DVC_STAGE", "eval_report")
    tracking._CLIENTS.clear()
    yield parent, copy
    tracking._CLIENTS.clear()


def test_store_is_the_repository_outputs_are_the_copy(store, monkeypatch):
    parent, copy = store
    cfg = load_config(REPO_ROOT / "params.yaml")
    assert tracking.store_root() == parent.resolve()
    assert tracking.project_root() == copy.resolve()
    assert tracking.tracking_uri(cfg) == f"sqlite:///{parent.resolve() / 'mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")                      # a plain run: the working copy
    assert tracking.store_root() == copy.resolve()


def test_each_evaluation_is_its_own_run_nested_under_the_training(store, tmp_path, monkeypatch):
    from jetformer.compare import Selection, load_runs
    from jetformer.eval.report import log_evaluation
    parent, _ = store
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=["mlflow.experiment=t"])
    train_id = tracking.start_run(cfg, "train-x", "hash")
    tracking.log_metrics(cfg, train_id, {"val_bits_per_dim": 2.5}, 10)
    tracking.end_run(cfg, train_id)
    first = log_evaluation(cfg, train_id, {"fid": 14.0, "t2i_num_samples": 300}, [])
    monkeypatch.setenv("DVC_EXP_NAME", "exp-two")
    second = log_evaluation(cfg, train_id, {"fid": 18.0, "t2i_num_samples": 100}, [])

    cl = tracking.client(cfg)
    assert cl.get_run(train_id).data.metrics == {"val_bits_per_dim": 2.5}   # untouched
    for run_id, exp, fid in ((first, "exp-one", 14.0), (second, "exp-two", 18.0)):
        run = cl.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["fid"] == fid
        tags = run.data.tags
        assert tags[tracking.TAG_PARENT] == tags[tracking.TAG_TRAINING_RUN] == train_id
        assert tags[tracking.TAG_DVC_EXP] == exp and tags[tracking.TAG_ROLE] == "eval"
        assert tags[tracking.TAG_DVC_BASELINE] == "b" * 40
        assert tags[tracking.TAG_SOURCE_NAME] == "dvc:eval_report"
        assert run.info.run_name == f"eval-{exp}"
    assert (parent / "mlflow.db").is_file()

    uri = tracking.tracking_uri(cfg)
    only = load_runs("t", uri, selection=Selection(dvc_exp="exp-two"))
    assert [r.run_id for r in only] == [second]
    evals = load_runs("t", uri, selection=Selection(role="eval"))
    assert [r.run_id for r in evals] == [first, second]
    children = load_runs("t", uri, parent_run=train_id)
    assert [r.metrics["fid"] for r in children] == [14.0, 18.0]
    with pytest.raises(ValueError, match="no runs matching .*exp-none"):
        load_runs("t", uri, selection=Selection(dvc_exp="exp-none"))


def test_compare_writes_the_selected_runs(store, tmp_path):
    from jetformer.compare import Selection, compare
    cfg = load_config(REPO_ROOT / "params.yaml", overrides=["mlflow.experiment=c"])
    ids = []
    for name in ("a", "b"):
        run_id = tracking.start_run(cfg, f"train-{name}", name,
                                    extra_tags={tracking.TAG_ABLATION_TABLE: "t2"} if name == "b"
                                    else None)
        tracking.log_metrics(cfg, run_id, {"loss": 1.0 + len(ids)}, 1)
        ids.append(run_id)
    written = compare("c", tracking.tracking_uri(cfg), out_dir=tmp_path / "out",
                      selection=Selection(ablation_table="t2"))
    with open(written["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["run_id"], float(r["loss"])) for r in rows] == [("train-b", ids[1], 2.0)]
    assert "ablation_table-t2" in written["csv"].name
