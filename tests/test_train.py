"""Training: schedule and optimiser maths, data order, kill-and-resume, the two-stage ablation,
divergence handling, failing before Ray on bad input, and one end-to-end Ray Train run
(2 workers, a worker SIGKILLed and recovered under FailureConfig, MLflow contents)."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from jetformer.config import load_config
from jetformer.train import checkpoint as ckpt
from jetformer.train.launch import absolute_paths
from jetformer.train.loop import BatchStream, NonFiniteLossError, train_loop
from jetformer.train.optim import (build_optimizer, build_scheduler, clip_gradients,
                                   decayed_parameters, lr_at)

REPO = Path(__file__).resolve().parent.parent

# the micro preset (tiny data and model) with a few more updates
MICRO = ("train.steps=6", "train.checkpoint_every=3", "train.log_every=1", "train.num_workers=1",
         "train.batch_size=8", "train.val_images=8", "train.sample_prompts=1")


# ----------------------------------------------------------------------------- fixtures
# `project`: the micro world prepared and a tokenizer trained (conftest.py)


def micro_cfg(project: Path, *overrides: str):
    cfg = load_config(REPO / "params.yaml", overlays=["micro"], overrides=(
        "data.prepared_dir=data/prepared", "tokenizer.out_path=models/tokenizer.model",
        f"mlflow.tracking_uri=sqlite:///{project / 'mlflow.db'}", *MICRO, *overrides))
    return absolute_paths(cfg, project)


class Keep:
    """A reporter that copies every checkpoint to `<dst>/step<N>` and can stop the run."""

    class Stop(Exception):
        pass

    def __init__(self, dst: Path, stop_at: int | None = None):
        self.dst, self.stop_at, self.steps = dst, stop_at, []

    def __call__(self, metrics, checkpoint_dir):
        self.steps.append(metrics["step"])
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.dst / f"step{metrics['step']}")
        if metrics["step"] == self.stop_at:
            raise Keep.Stop


# ----------------------------------------------------------------------------- optimiser maths
def test_lr_schedule_warmup_then_cosine_to_zero():
    kw = dict(base_lr=1e-3, total_steps=100, warmup_frac=0.1)
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)   # linear warm-up
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10] == pytest.approx(1e-3)                                    # cosine starts at peak
    assert lrs[55] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(b < a for a, b in zip(lrs[10:], lrs[11:]))                      # then decays ...
    assert 0 < lrs[-1] < 1e-6                                                  # ... to ~0


def test_weight_decay_decoupled_and_only_on_weight_matrices(make_cfg):
    cfg = make_cfg("train.lr=0.01", "train.weight_decay=1e-4")
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decayed = decayed_parameters(model)
    assert decayed == {id(model[1].weight)}
    opt = build_optimizer(model, cfg.train)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model[1].weight)] == pytest.approx(1e-4 / 0.01)   # torch multiplies by lr
    assert wd[id(model[1].bias)] == 0 and wd[id(model[0].weight)] == 0
    # with zero gradients one step is pure decay: w <- w (1 - lr * wd_torch) = w (1 - 1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model[1].weight, before["1.weight"] * (1 - 1e-4))
    torch.testing.assert_close(model[0].weight, before["0.weight"])
    torch.testing.assert_close(model[2].weight, before["2.weight"])


def test_flow_lr_scale_applies_to_the_codec_only_and_keeps_decay_per_step(make_cfg):
    cfg = make_cfg("train.lr=0.01", "train.flow_lr_scale=4", "train.weight_decay=1e-4")
    model = nn.Module()
    model.codec, model.decoder = nn.Linear(3, 3), nn.Linear(3, 3)
    opt = build_optimizer(model, cfg.train)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert (lr[id(model.codec.weight)] == pytest.approx(0.04)
            and lr[id(model.codec.bias)] == pytest.approx(0.04))
    assert lr[id(model.decoder.weight)] == pytest.approx(0.01)
    # one Adam step with unit gradients moves every parameter by its group's lr (plus decay)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(model.codec.bias, before["codec.bias"] - 0.04)
    torch.testing.assert_close(model.decoder.bias, before["decoder.bias"] - 0.01)
    torch.testing.assert_close(model.codec.weight, before["codec.weight"] * (1 - 1e-4) - 0.04)
    # the schedule scales each group's own lr
    build_scheduler(opt, cfg.train, total_steps=10)
    assert [g["lr"] / g["initial_lr"] for g in opt.param_groups] == pytest.approx(
        [lr_at(0, base_lr=0.01, total_steps=10, warmup_frac=cfg.train.warmup_frac) / 0.01] * 4)


def test_clip_gradients_returns_norm_before_clipping():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_gradients([p], 1.0) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_gradients([p], 0.0) == pytest.approx(5.0)             # 0 = no clipping
    assert float(p.grad.norm()) == pytest.approx(5.0)


def test_batch_stream_epochs_are_permutations_and_resume_exactly():
    s = BatchStream(num_items=10, batch=4, seed=3, rank=1)
    first = [s.next() for _ in range(5)]                                # 20 items = 2 epochs
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]                                      # reshuffled per epoch
    s2 = BatchStream(10, 4, seed=3, rank=1)
    [s2.next() for _ in range(2)]
    state = s2.state()
    s3 = BatchStream(10, 4, seed=3, rank=1)
    s3.load_state(state)
    assert [s3.next() for _ in range(3)] == first[2:]
    assert BatchStream(10, 4, seed=3, rank=0).next() != first[0]       # ranks differ


# ----------------------------------------------------------------------------- the loop
def _equal_state(a: dict, b: dict):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert a["scheduler"] == b["scheduler"]
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k


def test_kill_and_resume_continues_with_identical_state(project, tmp_path):
    cfg = micro_cfg(project, "model.ema_decay=0.9")
    full = Keep(tmp_path / "full")
    train_loop(cfg, rank=0, world_size=1, reporter=full)
    assert full.steps == [3, 6]

    stopped = Keep(tmp_path / "stopped", stop_at=3)                    # "killed" after the ckpt
    with pytest.raises(Keep.Stop):
        train_loop(cfg, rank=0, world_size=1, reporter=stopped)
    rows = []
    resumed = Keep(tmp_path / "resumed")
    train_loop(cfg, rank=0, world_size=1, reporter=resumed, progress=rows.append,
               resume_from=str(tmp_path / "stopped/step3"))
    assert rows[0]["event"] == "start" and rows[0]["step"] == 3 and rows[0]["resumed"]
    assert [r["step"] for r in rows if "loss" in r] == [4, 5, 6]       # continues from step 3
    assert resumed.steps == [6]
    a = ckpt.load_state(tmp_path / "full/step6")
    b = ckpt.load_state(tmp_path / "resumed/step6")
    assert a["step"] == b["step"] == 6
    _equal_state(a, b)                                                 # model, Adam, EMA, lr
    assert a["rank_states"][0]["data_position"] == b["rank_states"][0]["data_position"]
    # the checkpoint at 3 differs from the end: the resumed run really trained
    mid = ckpt.load_state(tmp_path / "stopped/step3")
    assert any(not torch.equal(mid["model"][k], b["model"][k]) for k in b["model"])


def test_two_stage_trains_flow_first_then_freezes_it(project, tmp_path):
    cfg = micro_cfg(project, "train.flow_pretrain_steps=3")
    keep = Keep(tmp_path)
    rows = []
    train_loop(cfg, rank=0, world_size=1, reporter=keep, progress=rows.append)
    torch.manual_seed(cfg.train.seed)                                  # as the loop initialises
    init = ckpt.build_model(cfg, ckpt.load_state(tmp_path / "step3")["vocab_size"], 0, None)
    s3, s6 = (ckpt.load_state(tmp_path / f"step{n}")["model"] for n in (3, 6))
    init = {k: v for k, v in init.state_dict().items()}
    flow = [k for k in s3 if k.startswith("codec.")]
    rest = [k for k in s3 if not k.startswith("codec.") and s3[k].is_floating_point()]
    assert flow and rest
    assert any(not torch.equal(s3[k], init[k]) for k in flow)          # stage 1 moved the flow
    assert all(torch.equal(s3[k], init[k]) for k in rest)              # ... and nothing else
    assert all(torch.equal(s6[k], s3[k]) for k in flow)                # stage 2: flow frozen
    assert any(not torch.equal(s6[k], s3[k]) for k in rest)            # ... the rest trains
    stages = [r["stage"] for r in rows if "loss" in r]
    assert stages == [0, 0, 0, 1, 1, 1]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(project, tmp_path, monkeypatch):
    from jetformer.models.jetformer import JetFormer
    real = JetFormer.compute_loss
    calls = {"n": 0}

    def poisoned(self, batch, sigma_rgb, train=True, generator=None):
        out = real(self, batch, sigma_rgb, train, generator)
        if train:
            calls["n"] += 1
            if calls["n"] == 5:                                        # the 5th update diverges
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(JetFormer, "compute_loss", poisoned)
    keep = Keep(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"update 5.*checkpoint \(update 3\) is kept"):
        train_loop(micro_cfg(project), rank=0, world_size=1, reporter=keep)
    assert keep.steps == [3]                                           # nothing after the NaN
    assert ckpt.load_state(tmp_path / "step3")["step"] == 3


# ----------------------------------------------------------------------------- before Ray
def _no_ray(monkeypatch):
    import ray

    def refuse(*a, **k):
        raise AssertionError("Ray must not start for invalid input")
    monkeypatch.setattr(ray, "init", refuse)


def test_invalid_params_fail_before_ray(tmp_path, monkeypatch, capsys):
    import importlib.util

    import yaml
    spec = importlib.util.spec_from_file_location("train_stage", REPO / "pipelines/train.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    _no_ray(monkeypatch)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = -1.0
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    assert stage.main(["--params", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "train.lr" in err and "-1.0" in err and str(bad) in err


def test_missing_prepared_data_fails_before_ray(tmp_path, monkeypatch):
    from jetformer.train.launch import run_training
    _no_ray(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "params.yaml", overrides=["data.prepared_dir=nowhere"])
    with pytest.raises(FileNotFoundError, match="nowhere.*metadata.json.*prepare"):
        run_training(cfg)


# ----------------------------------------------------------------------------- Ray end to end
def _killing_train_fn(rank: int, step: int, marker: Path):
    """A Ray Train worker function that runs `launch._train_fn` but SIGKILLs worker `rank` once
    (`marker` not yet there) when its progress reaches `step`. A local function, so Ray pickles
    it by value into the worker processes, where it patches the worker's own `train_loop`."""
    def train_fn(config: dict) -> None:
        import os
        import signal

        from jetformer.train import launch as worker_launch
        real_loop = worker_launch.train_loop

        def loop(cfg, **kw):
            progress = kw["progress"]

            def dying(row: dict) -> None:
                progress(row)
                if kw["rank"] == rank and row.get("step", 0) >= step and not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_loop(cfg, **{**kw, "progress": dying})
        worker_launch.train_loop = loop
        try:
            worker_launch._train_fn(config)
        finally:
            worker_launch.train_loop = real_loop
    return train_fn


@pytest.mark.slow
def test_ray_two_workers_recover_from_killed_worker_and_track_in_mlflow(project, monkeypatch,
                                                                         capfd):
    """2 Ray workers (DDP over gloo); worker 1 is SIGKILLed at step 5, Ray restarts the group
    from the last checkpoint (FailureConfig) and the run finishes; MLflow holds the run."""
    from jetformer.train import launch, tracking
    from jetformer.train.launch import run_training
    monkeypatch.chdir(project)
    cfg = micro_cfg(project, "train.num_workers=2", "train.steps=8", "train.checkpoint_every=2",
                    "train.log_every=2", "train.max_failures=2", "mlflow.experiment=test-train")
    marker = project / "killed_worker"
    monkeypatch.setattr(launch, "_train_fn", _killing_train_fn(rank=1, step=5, marker=marker))
    out = run_training(cfg)
    console = capfd.readouterr().out
    assert "2 worker(s) on cpu, starting" in console
    assert "resuming at step" in console                               # FailureConfig restart
    assert marker.is_file()                                            # the kill happened
    assert out["steps"] == 8 and math.isfinite(out["val_bits_per_dim"])

    # outputs
    summary = json.loads((project / "metrics/train.json").read_text())
    for key in ("train_bits_per_dim", "val_bits_per_dim", "train_text_nll", "val_text_nll",
                "examples_per_s", "wall_time_s", "steps"):
        assert summary[key] is not None, key
    curves = (project / "plots/train.csv").read_text().splitlines()
    assert (curves[0].startswith("step,")
            and [int(l.split(",")[0]) for l in curves[1:]] == [2, 4, 6, 8])
    assert any(p.suffix == ".png" for p in (project / "plots/train_samples").iterdir())
    model, loaded_cfg = ckpt.load_trained(project / "models/checkpoint", device="cpu")
    assert not model.training and loaded_cfg.train.steps == 8
    state = ckpt.load_state(Path(json.loads((Path(out["run_dir"]) / "final.json").read_text())
                                 ["checkpoint"]))
    assert len(state["rank_states"]) == 2                              # both workers' RNG/data
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k

    # MLflow: params, per-step metrics, tags, artifacts
    assert summary["mlflow_run_id"] == out["run_id"]                  # evaluation nests under it
    cl = tracking.client(cfg)
    run = cl.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("train-")
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["model.factoring"] == "post_flow"
    assert len(run.data.params) == len(cfg.flat())
    assert {"git_commit", "dvc_lock_sha1", "config_hash"} <= set(run.data.tags)
    loss_steps = sorted({m.step for m in cl.get_metric_history(run.info.run_id, "loss")})
    assert loss_steps == [2, 4, 6, 8]
    for key in ("bits_per_dim", "text_nll", "sigma_rgb", "lr", "grad_norm", "examples_per_s",
                "logdet_per_dim", "val_bits_per_dim", "final_val_bits_per_dim"):
        assert key in run.data.metrics, key
    sigmas = [m.value for m in sorted(cl.get_metric_history(run.info.run_id, "sigma_rgb"),
                                      key=lambda m: m.step)]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > sigmas[-1]  # curriculum decays
    artifacts = {a.path for d in ("metrics", "plots", "checkpoint", "samples")
                 for a in cl.list_artifacts(run.info.run_id, d)}
    assert {"metrics/train.json", "plots/train.csv", "checkpoint/model.pt"} <= artifacts
    assert any(a.startswith("samples/") and a.endswith(".png") for a in artifacts)

    # the same config again: the finished run is exported again, not retrained (no Ray)
    _no_ray(monkeypatch)
    again = run_training(cfg)
    assert again["run_id"] == out["run_id"] and again["steps"] == 8
    assert "already finished" in capfd.readouterr().out
