"""Parameter loading: defaults, overlays, overrides, and clear failures before any compute."""

import pytest
import yaml

from jetformer.config import (Config, ConfigError, config_from_dict, load_config, parse_override,
                              REPO_ROOT)

PARAMS = REPO_ROOT / "params.yaml"


def test_params_yaml_matches_schema_defaults():
    """params.yaml restates every default of the schema (no drift between file and code)."""
    assert load_config(PARAMS).to_dict() == Config().to_dict()


def test_override_and_overlay_merge(tmp_path):
    ov = tmp_path / "ov.yaml"
    ov.write_text(yaml.safe_dump({"train": {"noise": {"sigma0": 32}}, "model": {"flow": {"width": 24}}}))
    cfg = load_config(PARAMS, overlays=[ov], overrides=["train.lr=3e-4", "train.noise.sigma_final=1"])
    assert cfg.train.noise.sigma0 == 32.0 and isinstance(cfg.train.noise.sigma0, float)
    assert cfg.model.flow.width == 24
    assert cfg.model.flow.num_couplings == Config().model.flow.num_couplings  # untouched sibling
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
    d = Config().to_dict()
    del d["eval"]["zeroshot_prompts"]
    d["eval"]["zeroshot_prompt"] = "a {}"
    assert config_from_dict(d).eval.zeroshot_prompts == ["a {}"]
    d["eval"]["zeroshot_prompt"] = "no placeholder"
    with pytest.raises(ConfigError, match="zeroshot_prompts"):
        config_from_dict(d)
