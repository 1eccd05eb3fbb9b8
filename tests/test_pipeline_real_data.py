"""`dvc repro` end to end on the real-format fixtures (tests/fixtures/): COCO captions as the
pretraining (and caption, FID reference) source, VQAv2 for VQA, the ImageFolder fixture with
ImageNet's synset mapping for zero-shot; params.yaml + the micro overlay. Every output DVC
recorded exists, and every metric is a number or null with a `<metric>_unavailable` reason."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jetformer.config import deep_merge, load_config_dict

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FIX = "tests/fixtures"        # relative to the repo root: the stages run there

REAL_DATA = {"data": {
    "source": "coco",
    "max_bad_fraction": 0.2,
    "coco": {"train_images": f"{FIX}/coco/train2014", "val_images": f"{FIX}/coco/val2014",
             "train_annotations": f"{FIX}/coco/annotations/captions_train2014.json",
             "val_annotations": f"{FIX}/coco/annotations/captions_val2014.json"},
    "vqav2": {"train_images": f"{FIX}/coco/train2014", "val_images": f"{FIX}/coco/val2014",
              **{f"{s}_questions": f"{FIX}/vqav2/v2_OpenEnded_mscoco_{s}2014_questions.json"
                 for s in ("train", "val")},
              **{f"{s}_annotations": f"{FIX}/vqav2/v2_mscoco_{s}2014_annotations.json"
                 for s in ("train", "val")}},
    "imagefolder": {"train_images": f"{FIX}/imagefolder/train",
                    "val_images": f"{FIX}/imagefolder/val",
                    "class_names": f"{FIX}/imagefolder/LOC_synset_mapping.txt"}},
    "train": {"num_workers": 1},          # two training images; the shapes smoke test has two
    "eval": {"zeroshot_prompts": ["a photo of a {}"]}}


def _locked_outputs(lock: dict) -> dict[str, list[str]]:
    """stage (foreach items resolved, e.g. prepare@vqa) -> paths of every output DVC recorded."""
    return {name: [o["path"] for o in stage.get("outs", [])]
            for name, stage in lock["stages"].items()}


def _unexplained_nulls(metrics: dict, where: str) -> list[str]:
    """Keys whose value is null without a non-empty `<key>_unavailable` reason (recursively)."""
    bad = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            bad += _unexplained_nulls(v, f"{where}:{k}")
        elif v is None:
            reason = metrics.get(f"{k}_unavailable")
            if not (isinstance(reason, str) and reason.strip()):
                bad.append(f"{where}:{k}")
        elif not isinstance(v, (int, float, str, list)):
            bad.append(f"{where}:{k}={v!r}")
    return bad


@pytest.mark.slow
def test_real_format_fixtures_dvc_repro_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO,
                             capture_output=True, check=True).stdout     # HEAD, not the work tree
    subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
    merged = load_config_dict(repo / "params.yaml",
                              overlays=[repo / "experiments/presets/micro.yaml"])
    params = deep_merge(merged, REAL_DATA)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1",
               OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "torch"))   # no Inception weights
    t0 = time.time()
    run = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, f"dvc repro failed:\n{run.stdout[-6000:]}\n{run.stderr[-6000:]}"

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outputs = _locked_outputs(lock)
    roles = ("pretrain", "caption", "vqa", "zeroshot", "fid")
    assert {f"prepare@{r}" for r in roles} | {"train", "sample", "evaluate_generation",
                                               "evaluate@vqa", "eval_report"} <= set(outputs)
    missing = [(s, p) for s, paths in outputs.items() for p in paths if not (repo / p).exists()]
    assert not missing, f"recorded outputs missing after dvc repro: {missing}"

    # every role got what it was configured with; roles fed by the pretraining data point there
    role = {r: json.loads((repo / f"data/prepared/{r}/role.json").read_text()) for r in roles}
    assert {r: role[r]["source"] for r in roles} == {
        "pretrain": "coco", "caption": "coco", "vqa": "vqav2", "zeroshot": "imagefolder",
        "fid": "coco"}
    assert role["caption"]["data"] == role["fid"]["data"] == "data/prepared/pretrain"
    assert role["zeroshot"]["class_names"] == ["goldfish", "brambling"]   # from the synset file

    metrics = {p: json.loads((repo / p).read_text())
               for paths in outputs.values() for p in paths
               if p.startswith("metrics/") and p.endswith(".json")}
    assert {"metrics/generation.json", "metrics/vqa.json", "metrics/eval.json"} <= set(metrics)
    bad = [b for p, m in metrics.items() for b in _unexplained_nulls(m, p)]
    assert not bad, f"metrics neither a number nor unavailable with a reason: {bad}"

    # each metric lives once, in its stage's file (metrics/eval.json holds only the beats_* checks)
    ev = {k: v for p, m in metrics.items() if p != "metrics/eval.json" for k, v in m.items()}
    assert all(k.startswith("beats_") or k == "mlflow_run_id" for k in metrics["metrics/eval.json"])
    # COCO has no labels or attributes: no judge; no Inception weights (empty TORCH_HOME)
    assert ev["judge_val_accuracy"] is None and "labels" in ev["judge_val_accuracy_unavailable"]
    assert ev["fid"] is None and "no meaningful feature extractor" in ev["fid_unavailable"]
    assert ev["class_attribute_accuracy"] is None                  # COCO has no classes
    for k in ("cider", "vqa_accuracy", "zeroshot_accuracy", "val_bits_per_dim"):
        assert isinstance(ev[k], (int, float)), (k, ev[k])
    assert metrics["metrics/vqa.json"]["vqa_num_questions"] == 2    # the fixture's val questions
    assert metrics["metrics/understanding.json"]["zeroshot_num_classes"] == 2
    assert (repo / "data/eval/samples/t2i.pt").is_file()
    assert not (repo / "data/eval/samples/class.pt").exists()       # class prompts need classes
    first_s = time.time() - t0
    again = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=300)    # role pointers are stable: nothing re-runs
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout[-3000:]
    print(f"real-format dvc repro: {first_s:.0f}s")
