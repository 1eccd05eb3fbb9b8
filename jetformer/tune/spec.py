"""The sweep-space file of `python -m jetformer sweep`: parsed and checked (`load_sweep`), the
base config every trial starts from, and the checks every point of the space must pass before
Ray starts.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jetformer.config import (ConfigError, deep_merge, flatten, load_config, load_config_dict,
                              read_yaml)

REPORTED_METRICS = ("val_bits_per_dim", "val_fid", "val_text_nll")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = ("name", "description", "presets", "overrides", "metric", "mode", "search",
            "num_samples", "scheduler", "validation", "space", "experiment")
# paths in the config that trials (other processes, other cwd) must see as absolute
PATH_KEYS = ("data.prepared_dir", "tokenizer.out_path", "tokenizer.model_path", "pca.out_path",
             "eval.judge_path", "eval.inception_weights")


class SweepError(ConfigError):
    """A sweep-space file is malformed, or a point of its space is not a valid config."""


# ----------------------------------------------------------------------------- the space file
@dataclass
class SweepSpec:
    name: str
    path: Path
    space: dict[str,
                dict]                       # key -> {"grid": [...]} | {"uniform": [lo, hi]} ...
    presets: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_fid"
    mode: str = "min"
    search: str = "grid"
    num_samples: int = 1                         # absent from the file: tune.num_samples
    scheduler: dict = field(default_factory=lambda: {"type": "asha", "grace_period": 0,
                                                     "reduction_factor": 2})
    validation: dict = field(default_factory=lambda: {"every": 0, "fid_samples": 200})
    experiment: str = ""                         # MLflow experiment ("" = mlflow.experiment)
    raw: dict = field(default_factory=dict)


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep-space file (keys, domains, metric, scheduler)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep-space file not found: {path} (e.g. experiments/sweeps/noise.yaml)")
    d = read_yaml(path)

    def fail(key: str, msg: str):
        return SweepError(f"{path}: '{key}' {msg}")

    unknown = sorted(set(d) - set(TOP_KEYS))
    if unknown:
        raise fail(unknown[0], f"is not a sweep key (valid: {list(TOP_KEYS)})")
    if not isinstance(d.get("space"), dict) or not d["space"]:
        raise fail("space", "must map parameter keys to values to search, e.g. "
                   "{'train.noise.sigma0': {'grid': [0, 8, 16, 32]}}")
    search = d.get("search", "grid")
    if search not in ("grid", "random"):
        raise fail("search", f"= {search!r}: must be 'grid' or 'random'")
    space = {}
    for key, dom in d["space"].items():
        if isinstance(dom, list):
            dom = {"grid" if search == "grid" else "choice": dom}
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
            raise fail(f"space.{key}", f"= {dom!r}: must be a list or one of "
                       + ", ".join(f"{{{k}: ...}}" for k in DOMAINS))
        kind, vals = next(iter(dom.items()))
        if not isinstance(vals, list) or not vals:
            raise fail(f"space.{key}.{kind}", f"= {vals!r}: must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(vals) != 2 or not all(isinstance(v, (int, float))
                                         for v in vals) or vals[0] >= vals[1]:
                raise fail(f"space.{key}.{kind}",
                           f"= {vals!r}: must be [low, high] with low < high")
            if kind == "loguniform" and vals[0] <= 0:
                raise fail(f"space.{key}.{kind}", f"= {vals!r}: needs low > 0")
        if search == "grid" and kind != "grid":
            raise fail(f"space.{key}", f"is {kind!r} but search is 'grid' (use search: random)")
        space[key] = {kind: vals}
    metric = d.get("metric", "val_fid")
    if metric not in REPORTED_METRICS:
        raise fail("metric", f"= {metric!r}: must be one of {list(REPORTED_METRICS)}")
    mode = d.get("mode", "min")
    if mode not in ("min", "max"):
        raise fail("mode", f"= {mode!r}: must be 'min' or 'max'")
    num_samples = d.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise fail("num_samples", f"= {num_samples!r}: must be an integer >= 1")
    sched = {"type": "asha", "grace_period": 0, "reduction_factor": 2, **(d.get("scheduler") or {})}
    if set(sched) - {"type", "grace_period", "reduction_factor"}:
        raise fail("scheduler", f"= {sched!r}: keys are type, grace_period, reduction_factor")
    if sched["type"] not in ("asha", "none"):
        raise fail("scheduler.type", f"= {sched['type']!r}: must be 'asha' or 'none'")
    if not isinstance(sched["grace_period"], int) or sched["grace_period"] < 0:
        raise fail("scheduler.grace_period", "must be an integer number of steps >= 0")
    if not isinstance(sched["reduction_factor"], (int, float)) or sched["reduction_factor"] <= 1:
        raise fail("scheduler.reduction_factor", "must be > 1")
    val = {"every": 0, "fid_samples": 200, **(d.get("validation") or {})}
    if set(val) - {"every", "fid_samples"}:
        raise fail("validation", f"= {val!r}: keys are every, fid_samples")
    for k in ("every", "fid_samples"):
        if not isinstance(val[k], int) or val[k] < 0:
            raise fail(f"validation.{k}", f"= {val[k]!r}: must be an integer >= 0")
    if metric == "val_fid" and val["fid_samples"] < 2:
        raise fail("validation.fid_samples", "must be >= 2 when the metric is val_fid")
    overrides = d.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise fail("overrides", "must map parameter keys to values")
    overrides = flatten(overrides)    # accept nested or dotted keys
    presets = d.get("presets") or []
    if not isinstance(presets, list):
        raise fail("presets", "must be a list of overlay names or paths")
    name = str(d.get("name") or path.stem)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise fail("name", f"= {name!r}: letters, digits, '-' and '_' only")
    return SweepSpec(name=name, path=path, space=space, presets=list(presets), overrides=overrides,
                     metric=metric, mode=mode, search=search, num_samples=num_samples,
                     scheduler=sched, validation=val, experiment=str(d.get("experiment") or ""),
                     raw=d)


def nest(flat: dict[str, Any]) -> dict:
    """{"train.noise.sigma0": 8} -> {"train": {"noise": {"sigma0": 8}}}."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def base_config_dict(spec: SweepSpec, params: str | Path = "params.yaml", presets=(),
                     sets=()) -> dict:
    """params + the CLI's presets + the sweep's presets + its overrides + the CLI's --set,
    derived values resolved (the dict every trial starts from)."""
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                 for k, v in spec.overrides.items()] + list(sets)
    d = load_config_dict(params, overlays=[*presets, *spec.presets], overrides=overrides)
    cfg = load_config(d)
    # the sweep reports val metrics at checkpoint steps: validation.every sets that interval
    every = spec.validation["every"] or cfg.train.checkpoint_every
    d = deep_merge(d, nest({"train.checkpoint_every": min(every, cfg.train.steps),
                            "train.num_workers": 1}))
    return load_config(d).to_dict()


def space_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Points that must all be valid configs: every grid combination, with each random
    domain at its ends (or each of its choices)."""
    axes = []
    for key, dom in spec.space.items():
        kind, vals = next(iter(dom.items()))
        if kind in ("uniform", "loguniform"):
            vals = [float(vals[0]), float(vals[1])]
        elif kind == "randint":
            vals = [int(vals[0]), int(vals[1]) - 1]   # Ray's randint excludes the upper bound
        axes.append([(key, v) for v in vals])
    points = [dict(p) for p in itertools.islice(itertools.product(*axes), 10_000)]
    return points


def check_space(spec: SweepSpec, base: dict) -> int:
    """Every point of the space is a valid config on top of `base`; returns the grid size."""
    for point in space_points(spec):
        try:
            load_config(deep_merge(base, nest(point)))
        except ConfigError as e:
            raise SweepError(f"{spec.path}: the point {point} is not a valid config: {e}") from None
    grid = 1
    for dom in spec.space.values():
        if "grid" in dom:
            grid *= len(dom["grid"])
    return grid * spec.num_samples


def check_curriculum_grace(spec: SweepSpec, base: dict) -> None:
    """ASHA compares trials at equal steps. While a trial's RGB noise curriculum is still
    running its bits/dim and FID are worse by construction (it is trained on noisier images),
    so stopping it then is biased against the curriculum the sweep studies: the grace period
    must reach the end of the longest curriculum in the space (or use `scheduler.type: none`)."""
    if spec.scheduler["type"] != "asha":
        return
    steps = base["train"]["steps"]
    grace = min(spec.scheduler["grace_period"] or base["train"]["checkpoint_every"], steps)
    for point in space_points(spec):
        n = load_config(deep_merge(base, nest(point))).train.noise
        end = math.ceil(n.curriculum_frac * steps) if n.sigma0 > n.sigma_final else 0
        if grace < end:
            raise SweepError(
                f"{spec.path}: 'scheduler.grace_period' = {grace} steps stops trials before "
                f"the noise curriculum of {point} ends at step {end} of {steps}: ASHA would "
                "judge high-sigma0 trials while their images are still noisier by "
                f"construction. Set grace_period >= {end} or scheduler.type: none")


def tune_param_space(spec: SweepSpec) -> dict:
    from ray import tune
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {"params": {key: make[kind](vals) for key, dom in spec.space.items()
                       for kind, vals in dom.items()}}


def sweep_id(spec: SweepSpec, base: dict) -> str:
    """Tune experiment name: a changed space or base config never resumes an old sweep."""
    import hashlib
    blob = json.dumps({"space": spec.raw, "base": base}, sort_keys=True, default=str)
    return f"{spec.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def absolute_paths(base: dict, root: Path) -> dict:
    """Trials run in other processes: make the config's file paths absolute."""
    flat = flatten(base)
    fixed = {k: str((root / flat[k]).resolve()) for k in PATH_KEYS
             if k in flat and isinstance(flat[k], str) and flat[k] and not os.path.isabs(flat[k])}
    return deep_merge(base, nest(fixed))


SEED_KEYS = ("seed", "train.seed")     # repeats of a setting, not settings to choose


def dvc_set_args(overlays, params: str | Path = "params.yaml") -> str:
    """`-S key=value ...` for `dvc exp run`: every key the overlays change in `params`, with
    derived values computed, e.g. `dvc exp run $(python -c "from jetformer.tune import
    dvc_set_args; print(dvc_set_args(['imagenet256']))")`."""
    base = load_config(params).flat()
    new = load_config(params, overlays=list(overlays)).flat()
    import shlex
    return " ".join("-S " + shlex.quote(f"{k}={json.dumps(v) if not isinstance(v, str) else v}")
                    for k, v in new.items() if base[k] != v)
