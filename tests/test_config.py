"""Parameter loading: defaults, overlays, overrides, and clear failures before any compute."""

import pytest
import yaml

from jetformer.config import (REPO_ROOT, ConfigError, config_from_dict, deep_merge, flatten,
                              load_config, parse_override, read_yaml)

PARAMS = REPO_ROOT / "params.yaml"


def test_params_yaml_states_every_key_of_the_schema():
    """params.yaml is the one place a value lives: it names every key of the schema (but the
    two question paths of COCO captions, which have none), and loading nothing else gives
    exactly its values."""
    stated = set(flatten(read_yaml(PARAMS)))
    schema = set(load_config(None).flat())
    assert schema - stated == {"data.coco.train_questions", "data.coco.val_questions"}
    assert stated <= schema
    assert load_config(None).to_dict() == load_config(PARAMS).to_dict() == load_config({}).to_dict()
    partial = load_config({"train": {"steps": 7}})
    assert partial.train.steps == 7 and partial.train.lr == load_config(None).train.lr


def test_only_declared_rules_relate_keys():
    """A stored config missing a key gets params.yaml's value; a word of FOLLOWS only where
    declared (elsewhere it is a wrong value naming the key)."""
    d = load_config(PARAMS).to_dict()
    del d["train"]["noise"]["curriculum_frac"]
    assert config_from_dict(d) == load_config(PARAMS)
    with pytest.raises(ConfigError, match=r"train\.steps.*'quarter'"):
        load_config(PARAMS, overrides=["train.steps=quarter"])
    with pytest.raises(ConfigError, match=r"model\.factored_dims.*'all'.*model\.patch_size"):
        load_config(PARAMS, overrides=["model.factored_dims=all", "model.patch_size=x"])
    cfg = load_config(PARAMS, overrides=["train.flow_pretrain_steps=quarter", "train.steps=10"])
    assert cfg.train.flow_pretrain_steps == 2


def test_override_and_overlay_merge(tmp_path):
    ov = tmp_path / "ov.yaml"
    ov.write_text(yaml.safe_dump({"train": {"noise": {"sigma0": 32}},
                                  "model": {"flow": {"width": 24}}}))
    cfg = load_config(PARAMS, overlays=[ov],
                      overrides=["train.lr=3e-4", "train.noise.sigma_final=1"])
    assert cfg.train.noise.sigma0 == 32.0 and isinstance(cfg.train.noise.sigma0, float)
    assert cfg.model.flow.width == 24
    assert cfg.model.flow.num_couplings == load_config(PARAMS).model.flow.num_couplings  # sibling
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.noise.sigma_final == 1.0


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=1", "train.lrr"),                      # unknown key
    ("model.flow.widht=3", "model.flow.widht"),        # unknown nested key
    ("train.steps=ten", "train.steps"),                # wrong type
    ("train.steps=1.5", "train.steps"),                # float for int
    ("train.lr=-0.001", "train.lr"),                   # negative lr
    ("model.factored_dims=49", "model.factored_dims"),  # d > 3p^2 = 48
    ("data.resolution=30", "data.resolution"),         # not divisible by p=4
    ("model.factoring=magic", "model.factoring"),      # bad choice
    ("train.task=class", "train.task"),                # task/conditioning mismatch
    ("model.factoring=pca", "pca.enabled"),            # pca factoring without the pca stage
    ("train.noise.sigma_final=99", "train.noise.sigma_final"),
])
def test_bad_params_fail_naming_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(PARAMS, overrides=[override])
    assert fragment in str(e.value)
    value = override.split("=", 1)[1]
    assert value in str(e.value) or fragment == "pca.enabled"


def test_overlay_with_unknown_key_names_the_file(tmp_path):
    ov = tmp_path / "broken.yaml"
    ov.write_text("train:\n  nosie:\n    sigma0: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*train\.nosie"):
        load_config(PARAMS, overlays=[ov])


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(PARAMS, overlays=["definitely_not_a_preset"])


def test_roundtrip_dict_and_hash():
    cfg = load_config(PARAMS, overrides=["train.steps=7"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(PARAMS).hash() != cfg.hash()
    assert cfg.flat()["train.steps"] == 7


def test_parse_override_types():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a=x y") == {"a": "x y"}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_checkpoint_config_with_the_legacy_zeroshot_key_still_loads():
    d = load_config(PARAMS).to_dict()
    del d["eval"]["zeroshot_prompts"]
    d["eval"]["zeroshot_prompt"] = "a {}"
    assert config_from_dict(d).eval.zeroshot_prompts == ["a {}"]
    d["eval"]["zeroshot_prompt"] = "no placeholder"
    with pytest.raises(ConfigError, match="zeroshot_prompts"):
        config_from_dict(d)


# ----------------------------------------------------------------------------- pinned hashes
# Ablation results and sweep trials are keyed by `Config.hash()`: a refactor of the loader must
# reproduce `to_dict()` (as JSON bytes, key order included) and `hash()` of every recorded
# setting. Record again (`PYTHONPATH=. .venv/bin/python tests/test_config.py --record`) only
# when a value changes on purpose.
HASHES = REPO_ROOT / "tests" / "fixtures" / "config_hashes.json"
SIZES = ("jetformer_b", "jetformer_m", "jetformer_l")


def _digest(cfg) -> dict:
    import hashlib
    import json
    text = json.dumps(cfg.to_dict())
    return {"hash": cfg.hash(), "data_hash6": cfg.hash(("data",), 6),
            "to_dict_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _record_cases() -> list[dict]:
    """Every preset alone and in the combinations the tests, ablate and sweep use; every
    ablation row (as `ablate` builds it) over table2, tiny+class_conditional and the default,
    with and without a --set; the noise sweep's trial configs."""
    from jetformer.ablate import ROWS, ablation_config
    from jetformer.config import PRESETS_DIR
    from jetformer.tune import base_config_dict, load_sweep, nest, space_points
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    stacks = [[]] + [[p] for p in presets] + [
        ["tiny", "class_conditional"], ["micro", "class_conditional"], ["jetformer_l", "tiny"],
        ["coco_ti", "tiny"], ["table2", "micro"]]
    stacks += [[s, r] for s in SIZES for r in ("coco_t2i", "coco_ti", "imagenet256")]
    cases = [{"overlays": s, "overrides": []} for s in stacks]
    cases += [{"overlays": s, "overrides": o} for s in ([], ["table2"], ["micro"])
              for o in (["train.steps=2000"], ["train.noise.sigma_final=1", "train.lr=3e-4"],
                        ["train.use_gpu=true", "eval.cfg_scale=1.5"])]
    for bases in (["table2"], ["tiny", "class_conditional"], []):
        for sets in ([], ["train.steps=2000"]):
            for row in ROWS:
                for seed in (0, 1):
                    try:
                        cfg = ablation_config(row.name, PARAMS, bases, sets, seed)
                    except ConfigError:
                        with pytest.raises(ConfigError):
                            load_config(PARAMS, bases + [row.name], sets)
                        cases.append({"overlays": bases + [row.name], "overrides": sets,
                                      "error": True})
                        continue
                    base = load_config(PARAMS, overlays=bases, overrides=sets)
                    extra = [f"seed={seed}", f"train.seed={seed}",
                             f"train.out_dir=models/ablations/{row.name}/seed{seed}",
                             f"mlflow.run_name=ablation-{row.name}-seed{seed}",
                             f"mlflow.experiment={cfg.mlflow.experiment}",
                             f"pca.out_path={cfg.pca.out_path}"]
                    overlays = bases + ([] if row.name == "baseline" else [row.name])
                    plain = load_config(PARAMS, overlays=overlays, overrides=sets + extra)
                    assert plain.to_dict() == cfg.to_dict() and base is not None
                    cases.append({"overlays": overlays, "overrides": sets + extra})
    spec = load_sweep(REPO_ROOT / "experiments" / "sweeps" / "noise.yaml")
    base = base_config_dict(spec, PARAMS)
    fixed = [f"{k}={v}" for k, v in spec.overrides.items()]
    fixed += [f"train.checkpoint_every={base['train']['checkpoint_every']}",
              "train.num_workers=1"]
    for point in space_points(spec):
        cfg = load_config(deep_merge(base, nest(point)))
        over = fixed + [f"{k}={v}" for k, v in point.items()]
        plain = load_config(PARAMS, overlays=spec.presets, overrides=over)
        assert plain.to_dict() == cfg.to_dict()
        cases.append({"overlays": list(spec.presets), "overrides": over})
    return cases


def _record() -> None:
    import json
    cases = _record_cases()
    for case in cases:
        if not case.get("error"):
            case.update(_digest(load_config(PARAMS, case["overlays"], case["overrides"])))
    default = load_config(PARAMS).to_dict()
    HASHES.parent.mkdir(exist_ok=True)
    HASHES.write_text(json.dumps({"default_to_dict": default, "cases": cases}, indent=1) + "\n")
    print(f"{len(cases)} cases -> {HASHES}")


def _pinned() -> dict:
    import json
    return json.loads(HASHES.read_text()) if HASHES.is_file() else {"cases": []}


def test_default_to_dict_is_pinned():
    assert load_config(PARAMS).to_dict() == _pinned()["default_to_dict"]


@pytest.mark.parametrize("case", _pinned()["cases"],
                         ids=lambda c: "+".join(c["overlays"]) + ",".join(c["overrides"]))
def test_hash_and_to_dict_are_pinned(case):
    """Each recorded setting loads to the same bytes and hash (ablation/sweep results are keyed
    by it); recorded failures still fail."""
    if case.get("error"):
        with pytest.raises(ConfigError):
            load_config(PARAMS, case["overlays"], case["overrides"])
        return
    cfg = load_config(PARAMS, case["overlays"], case["overrides"])
    assert _digest(cfg) == {k: case[k] for k in ("hash", "data_hash6", "to_dict_sha256")}


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--record"]:
        _record()
