"""Fuzzed parameter files (hypothesis): wrong types, nesting, unicode keys, huge or NaN numbers,
lists where scalars belong, derived-value expressions, unknown keys at any depth. Loading
either gives a valid Config or raises a one-line `ConfigError` naming the key, never another
exception or a hang."""
import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetformer.config import REPO_ROOT, ConfigError, flatten, load_config, read_yaml

BASE = read_yaml(REPO_ROOT / "params.yaml")
LEAVES = sorted(flatten(BASE))
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=12),
    st.integers(), st.integers(min_value=-10**400, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, 0, -1,
                     2**63, 10**30, "1e-3", "nan", "inf", "yes", "", "\u202e\u0000", "名前"]))
derived = st.sampled_from([
    "= 10 ** 10 ** 10", "= 9 ** 9 ** 9 ** 9", "= 2 ** 100000", "= -(10 ** 400)", "= 1 / 0",
    "= 10 ** 400 * 1.0", "= model.nope", "= train.steps // 0", "= __import__('os')",
    "= min()", "= int(1e400)", "= round(1e308 * 10)", "= 1e308 * 10", "= ((((((1", "=",
    "= train.steps", "= model.patch_size * 2", "= 'text'", "= [1, 2]", "= data.source"])
values = st.recursive(st.one_of(scalars, derived),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.text(max_size=6), inner,
                                                              max_size=3)),
                      max_leaves=8)
odd_keys = st.one_of(st.text(min_size=1, max_size=10), st.integers(), st.booleans(),
                     st.sampled_from(["données", "模型", "\u0301", "train ", "Train", "lr\n"]))


def _set(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d[p]
    d[leaf] = value


def _load(tmp_path, data) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    load_config(path)


def _names(err: ConfigError, *candidates: str) -> bool:
    msg = str(err)
    return any(c in msg for c in candidates)


@SETTINGS
@given(key=st.sampled_from(LEAVES + SECTIONS), value=values)
def test_wrong_value_anywhere_is_a_config_error_naming_the_key(tmp_path_factory, key, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    _set(data, key, value)
    try:
        _load(tmp_path_factory.mktemp("f"), data)
    except ConfigError as e:
        assert "\n" not in str(e).strip(), str(e)
        assert _names(e, key, key.rsplit(".", 1)[-1]), (key, value, str(e))


@SETTINGS
@given(section=st.sampled_from([""] + SECTIONS), keys=st.lists(odd_keys, min_size=1, max_size=3),
       value=values)
def test_unknown_or_unicode_keys_are_a_config_error_naming_one(tmp_path_factory, section, keys,
                                                              value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node = data
    for p in filter(None, section.split(".")):
        node = node[p]
    keys = [k for k in keys if k not in node]
    if not keys:
        return                                  # not unknown: covered by the test above
    for k in keys:
        node[k] = value
    try:
        _load(tmp_path_factory.mktemp("f"), data)
    except ConfigError as e:
        assert _names(e, *map(str, keys), *map(repr, keys)), (section, keys, str(e))
    else:
        raise AssertionError(f"unknown keys {keys!r} in '{section}' were accepted")


@SETTINGS
@given(keys=st.lists(st.sampled_from(LEAVES), min_size=2, max_size=6, unique=True),
       vals=st.lists(values, min_size=6, max_size=6))
def test_several_wrong_values_name_one_of_them(tmp_path_factory, keys, vals):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for k, v in zip(keys, vals):
        _set(data, k, v)
    try:
        _load(tmp_path_factory.mktemp("f"), data)
    except ConfigError as e:
        assert _names(e, *keys, *(k.rsplit(".", 1)[-1] for k in keys)), (keys, str(e))


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text_as_parameter_file_never_tracebacks(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("f") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e) or "key" in str(e), str(e)


def test_nan_and_huge_numbers_are_named():
    for key, value in [("train.lr", float("nan")), ("train.lr", 10**400),
                       ("train.steps", float("nan")), ("data.resolution", [8]),
                       ("train.noise.sigma0", float("inf"))]:
        data = yaml.safe_load(yaml.safe_dump(BASE))
        _set(data, key, value)
        try:
            load_config(data)
        except ConfigError as e:
            assert key in str(e)
        else:
            raise AssertionError(f"{key}={value!r} accepted")
    assert math.isfinite(load_config(BASE).train.lr)
