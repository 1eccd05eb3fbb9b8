"""Loading a checkpoint never runs code from it (`jetformer.safe_io`): a file whose unpickling
would create a marker file is refused with a one-line error naming it, at every entry point,
and the marker never appears; normal checkpoints round-trip exactly; old checkpoints with
pickled numpy objects are refused with the conversion command, which then makes them load."""
import pickle

import numpy as np
import pytest
import torch
from conftest import make_tiny_cfg

from jetformer.cli import main
from jetformer.data.pca import load_pca, save_pca
from jetformer.models.jetformer import JetFormer
from jetformer.safe_io import UnsafeFileError, atomic_torch_save, safe_load
from jetformer.train import checkpoint as ckpt


class Payload:
    """Unpickling this calls `open(marker, "w")`: code from the file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_export(tmp_path, randomize):
    cfg = make_tiny_cfg("model.conditioning=class", "train.task=class", "model.num_classes=3")
    torch.manual_seed(0)
    model = randomize(JetFormer.from_config(cfg, vocab_size=4, num_classes=3))
    state = {"config": cfg.to_dict(), "vocab_size": 4, "num_classes": 3, "pca": None,
             "step": 1, "model": model.state_dict(), "ema": None}
    return model, state, ckpt.export_model(state, tmp_path / "ck")


def _write_malicious(path, marker, how):
    obj = {"format": ckpt.MODEL_FORMAT, "config": {}, "payload": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
def test_payload_really_runs_when_unpickled_unsafely(tmp_path, how):
    """The fixture is a real attack: plain unpickling creates the marker."""
    marker = tmp_path / "pwned"
    _write_malicious(tmp_path / "model.pt", marker, how)
    if how == "pickle":
        pickle.loads((tmp_path / "model.pt").read_bytes())
    else:
        torch.load(tmp_path / "model.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
def test_malicious_checkpoint_refused_everywhere_marker_never_appears(tmp_path, how, capsys):
    marker = tmp_path / "pwned"
    ck = tmp_path / "ck"
    _write_malicious(ck / ckpt.MODEL_FILE, marker, how)
    _write_malicious(tmp_path / "run" / ckpt.STATE_FILE, marker, how)
    _write_malicious(tmp_path / "pca.pt", marker, how)
    calls = [lambda: ckpt.load_trained(ck, device="cpu"),
             lambda: ckpt.load_trained(ck / ckpt.MODEL_FILE, device="cpu"),
             lambda: ckpt.load_state(tmp_path / "run"),
             lambda: ckpt.load_state_or_previous(tmp_path / "run"),
             lambda: load_pca(tmp_path / "pca.pt"),
             lambda: safe_load(ck / ckpt.MODEL_FILE, "samples")]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "refused" in msg and ".pt" in msg, msg
        assert not marker.exists()
    # the command line: one line on stderr, exit status 1, nothing run
    for argv in (["sample", "--checkpoint", str(ck), "--label", "0"],
                 ["nll", "--checkpoint", str(ck), str(tmp_path / "x.png")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and str(ck) in err, err
    assert not marker.exists()


def test_zip_payload_message_names_the_callable_and_the_conversion(tmp_path):
    marker = tmp_path / "pwned"
    _write_malicious(tmp_path / "model.pt", marker, "zip")
    with pytest.raises(UnsafeFileError, match=r"model\.pt: refused .* would call .*open.*"
                                              r"jetformer\.train\.checkpoint convert"):
        safe_load(tmp_path / "model.pt", "model checkpoint")
    assert not marker.exists()


def test_export_round_trip_gives_identical_outputs(tmp_path, randomize):
    model, _, file = _tiny_export(tmp_path, randomize)
    blob = torch.load(file, weights_only=True)            # plain data: weights_only reads it
    assert blob["format"] == ckpt.MODEL_FORMAT and isinstance(blob["config"], dict)
    loaded, _ = ckpt.load_trained(tmp_path / "ck", device="cpu")
    model.eval()
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    batch = {"images": images, "labels": torch.tensor([0, 2])}
    with torch.no_grad():
        a = model.compute_loss(batch, 0.0, train=False, generator=torch.Generator().manual_seed(1))
        b = loaded.compute_loss(batch, 0.0, train=False, generator=torch.Generator().manual_seed(1))
    assert a.keys() == b.keys() and torch.isfinite(a["loss"])
    for k in a:
        assert torch.equal(a[k], b[k]) or (a[k].isnan().all() and b[k].isnan().all()), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_pca_round_trip_and_rejects_non_pca(tmp_path):
    pca = {"components": torch.eye(12), "mean": torch.zeros(12),
           "explained_variance": torch.ones(12), "patch_size": 2}
    save_pca(pca, tmp_path / "pca.pt")
    back = load_pca(tmp_path / "pca.pt", patch_size=2)
    assert all(torch.equal(back[k], pca[k]) for k in ("components", "mean"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a PCA file"):
        load_pca(tmp_path / "list.pt")


def test_saving_non_plain_data_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"rank_states\[0\]\.numpy: numpy\.ndarray"):
        atomic_torch_save({"rank_states": [{"numpy": np.zeros(3)}]}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_numpy_rng_state_round_trips_as_plain_data(tmp_path):
    np.random.seed(123)
    np.random.standard_normal()            # leaves a cached gaussian in the state
    s = ckpt.numpy_rng_state()
    atomic_torch_save({"numpy": s}, tmp_path / "rng.pt")
    expected = np.random.standard_normal(5)
    np.random.seed(0)
    ckpt.set_numpy_rng_state(safe_load(tmp_path / "rng.pt")["numpy"])
    assert np.array_equal(np.random.standard_normal(5), expected)


def test_old_checkpoint_with_numpy_objects_is_refused_then_converts(tmp_path, randomize, capsys):
    """A state written before the change (numpy RNG tuple, numpy scalar metric) is refused
    with the conversion command; `convert` rewrites it (keeping a backup) and it loads."""
    _, state, _ = _tiny_export(tmp_path, randomize)
    np.random.seed(7)
    legacy_np = np.random.get_state()
    expected = np.random.random(3)
    old = {"format": ckpt.STATE_FORMAT, **state, "metrics": {"loss": np.float64(1.5)},
           "rank_states": [{"numpy": legacy_np, "python": (3, tuple(range(625)), None)}]}
    run = tmp_path / "run"
    run.mkdir()
    torch.save(old, run / ckpt.STATE_FILE)
    with pytest.raises(UnsafeFileError) as e:
        ckpt.load_state(run)
    assert f"python -m jetformer.train.checkpoint convert {run / ckpt.STATE_FILE}" in str(e.value)
    assert ckpt.main(["convert", str(run / ckpt.STATE_FILE)]) == 0
    assert (run / "state.pt.unsafe-backup").is_file()              # nothing is lost
    new = ckpt.load_state(run)
    assert new["metrics"]["loss"] == 1.5 and isinstance(new["metrics"]["loss"], float)
    for k, v in state["model"].items():
        assert torch.equal(new["model"][k], v), k
    np.random.seed(0)
    ckpt.set_numpy_rng_state(new["rank_states"][0]["numpy"])
    assert np.array_equal(np.random.random(3), expected)
    # converting again is a no-op; a missing file is a one-line error, exit 1
    assert ckpt.main(["convert", str(run / ckpt.STATE_FILE)]) == 0
    assert ckpt.main(["convert", str(tmp_path / "nope.pt")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_checkpoint_exported_before_the_change_still_loads(tmp_path, randomize):
    """Old exports held only plain data already (config dict, tensors): they load as before."""
    model, state, _ = _tiny_export(tmp_path, randomize)
    old = tmp_path / "old" / ckpt.MODEL_FILE
    old.parent.mkdir()
    torch.save({"format": ckpt.MODEL_FORMAT, **state}, old)      # plain torch.save, no checks
    loaded, _ = ckpt.load_trained(old.parent, device="cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
