"""Typed parameters: `params.yaml` + optional overlay files, validated before any compute.

`params.yaml` (DVC owns it) is the one place a value lives; the classes below give each key its
type and range (pydantic, next to the field) and the rules that tie keys together (`check`).
`load_config()` layers the given params file, overlays (`experiments/presets/jetformer_l.yaml`,
`experiments/ablations/no_flow.yaml`, ...) and dotted overrides (`train.lr=3e-4`) over the
repository's `params.yaml`, so a partial file or an older checkpoint's dict gets the repository's
values for what it lacks. Any problem raises `ConfigError` naming the file, the key and the value.
The result is plain data (big_vision style): nested dataclasses mirroring `params.yaml`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = REPO_ROOT / "params.yaml"
PRESETS_DIR = REPO_ROOT / "experiments" / "presets"
ABLATIONS_DIR = REPO_ROOT / "experiments" / "ablations"


class ConfigError(ValueError):
    """A parameter is unknown, has the wrong type, or is inconsistent with another."""


class _Broken(Exception):
    """A cross-field rule failed: (key, value, message); the loader adds the file."""


def _require(ok: bool, key: str, value: Any, msg: str) -> None:
    if not ok:
        raise _Broken(key, value, msg)


# ----------------------------------------------------------------------------- field types
def _number(v: Any) -> float:
    """A finite float; YAML reads `1e-3` (no dot) as a string, so numeric strings count."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("must be a number")
    try:
        v = float(v)
    except ValueError:
        raise ValueError("must be a number") from None
    except OverflowError:                       # an integer beyond the float range
        raise ValueError("must be a finite number") from None
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def _num(**bounds) -> Any:
    return Annotated[float, BeforeValidator(_number), Field(**bounds)]


# Int / PosInt (> 0) / Count (>= 0): integers (no bool, no 2.0); Num / PosNum / NonNeg / Frac
# ([0, 1]) / Decay ([0, 1)): finite floats; Str, Bool: exactly that YAML type.
Int = Annotated[int, Field(strict=True)]
PosInt = Annotated[int, Field(strict=True, gt=0)]
Count = Annotated[int, Field(strict=True, ge=0)]
Num, PosNum, NonNeg = _num(), _num(gt=0), _num(ge=0)
Frac, Decay = _num(ge=0, le=1), _num(ge=0, lt=1)              # [0, 1] and [0, 1)
Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Prompts = Annotated[list[Str], Field(strict=True, min_length=1)]
GpuChoice = Annotated[Literal["auto", "true", "false"],        # YAML reads true/false as bools
                      BeforeValidator(lambda v: str(v).lower() if isinstance(v, bool) else v)]


@typing.dataclass_transform()
def section(cls: type) -> type:
    """A section of params.yaml: a dataclass whose unknown keys pydantic refuses. Its fields
    have no defaults (params.yaml holds the values); `dataclasses.replace` does not validate."""
    cls.__pydantic_config__ = ConfigDict(extra="forbid")
    return dataclass(cls)


# ----------------------------------------------------------------------------- schema
@section
class SyntheticConfig:
    """The embedded procedural "shapes" world (`jetformer.data.synthetic`)."""
    out_dir: Str
    num_train: PosInt
    num_val: PosInt
    seed: Int
    min_side: Int                   # raw images have random sizes in [min_side, max_side]
    max_side: Int
    bad_files: Bool                 # a handful of deliberately bad files per split
    world: Literal["shapes", "photo"]

    def check(self) -> None:
        _require(self.min_side <= self.max_side, "data.synthetic.min_side", self.min_side,
                 f"must be <= data.synthetic.max_side={self.max_side}")


@section
class SourcePaths:
    """Paths of a real source (COCO captions, VQAv2). Empty = unused."""
    train_images: Str
    val_images: Str
    train_annotations: Str          # COCO captions JSON / VQAv2 annotations JSON
    val_annotations: Str
    # VQAv2 questions JSON; COCO captions have none, so params.yaml leaves them out there
    train_questions: Str = ""
    val_questions: Str = ""


@section
class ImageFolderPaths:
    """An ImageFolder source (ImageNet layout `<root>/<class dir>/<image>`). `class_names`: a
    file naming the classes (`jetformer.data.classnames`): one name per line in class order,
    the ImageNet synset mapping (`n01440764 tench, Tinca tinca`) or a JSON {dir: name}."""
    train_images: Str
    val_images: Str
    class_names: Str


@section
class RoleConfig:
    """Which source feeds one role (auto | none | a source: ROLE_SOURCES), and where its
    `prepare@<role>` output goes."""
    source: Str
    prepared_dir: Str


@section
class RolesConfig:
    """The evaluation roles' data (paper §4: pretrain on image-text pairs or ImageNet, fine-tune
    and evaluate captioning on COCO, VQA on VQAv2, zero-shot classification on ImageNet, FID
    against a reference set). `auto` is resolved by `role_source`."""
    caption: RoleConfig
    vqa: RoleConfig
    zeroshot: RoleConfig
    fid: RoleConfig


@section
class DataConfig:
    source: Str                     # the pretraining source: PRETRAIN_SOURCES
    resolution: PosInt              # shorter side resized to this, then central crop
    prepared_dir: Str
    workers: PosInt
    shard_size: PosInt
    max_bad_fraction: Frac          # fail if more than this fraction of files is unreadable
    min_image_side: PosInt
    max_images: Count               # 0 = all
    flip: Bool
    synthetic: SyntheticConfig
    imagefolder: ImageFolderPaths
    coco: SourcePaths
    vqav2: SourcePaths
    roles: RolesConfig


@section
class TokenizerConfig:
    vocab_size: PosInt
    model_path: Str                 # a given sentencepiece .model ("" = train one)
    out_path: Str
    max_text_len: PosInt            # text tokens per sequence incl. EOS


@section
class PCAConfig:
    enabled: Bool
    num_images: Count
    out_path: Str


@section
class FlowConfig:
    """Jet (paper §4 "Architecture"): channel-wise affine couplings, ViT blocks predict
    scale/shift; the scale cap is 2^(couplings/2) per dim."""
    num_couplings: Count
    width: PosInt
    depth: Count                    # ViT blocks per coupling
    num_heads: PosInt
    mlp_dim: PosInt
    dropout: Frac


@section
class DecoderConfig:
    """Gemma-style decoder (RMSNorm, RoPE, MQA, GeGLU)."""
    width: PosInt
    depth: PosInt
    num_heads: PosInt
    head_dim: PosInt
    mlp_dim: PosInt
    dropout: Frac
    rope_base: PosNum

    def check(self) -> None:
        _require(self.head_dim % 2 == 0, "model.decoder.head_dim", self.head_dim,
                 "RoPE needs an even head_dim")


@section
class ModelConfig:
    patch_size: PosInt
    factored_dims: Int              # d: dims per token modelled by the transformer
    factoring: Literal["post_flow", "learnable_w", "pca", "none", "no_flow"]  # paper Table 2
    conditioning: Literal["text", "class"]
    num_classes: Count              # class-conditional only; 0 = read from the prepared data
    num_class_tokens: PosInt
    num_mixtures: PosInt            # K of the GMM head
    latent_noise_max: NonNeg        # per-example sigma ~ U(0, max) on text-first rows
    ema_decay: Decay                # 0 = no EMA
    flow: FlowConfig
    decoder: DecoderConfig

    def check(self) -> None:
        d, f, dims = self.factored_dims, self.flow, 3 * self.patch_size ** 2
        key = "model.factored_dims"
        _require(0 < d <= dims, key, d, f"must be in [1, 3*patch_size^2 = {dims}]")
        _require(self.factoring not in ("none", "no_flow") or d == dims, key, d,
                 f"factoring='{self.factoring}' models all dims: must equal "
                 f"3*patch_size^2 = {dims}")
        _require(self.factoring not in ("learnable_w", "pca") or d >= 2, key, d,
                 f"factoring='{self.factoring}' runs the flow on d dims: needs d >= 2")
        if self.factoring != "no_flow":
            _require(f.num_couplings > 0, "model.flow.num_couplings", f.num_couplings,
                     "a flow needs at least one coupling")
            _require(f.width % f.num_heads == 0, "model.flow.width", f.width,
                     f"must be divisible by model.flow.num_heads={f.num_heads}")
        self.decoder.check()


@section
class NoiseConfig:
    """RGB noise curriculum (paper §3.2): sigma_t = final + (sigma0 - final)(1 + cos(pi t))/2
    over the first `curriculum_frac` of training, then final."""
    sigma0: NonNeg
    sigma_final: NonNeg
    curriculum_frac: Frac

    def check(self) -> None:
        _require(self.sigma_final <= self.sigma0, "train.noise.sigma_final", self.sigma_final,
                 f"must be <= train.noise.sigma0={self.sigma0}")


@section
class TrainConfig:
    task: Literal["t2i", "i2t", "both", "class"]
    steps: PosInt
    batch_size: PosInt              # global batch, split across workers
    lr: PosNum
    flow_lr_scale: PosNum           # the flow's (codec's) learning rate = lr x this
    warmup_frac: Frac
    weight_decay: NonNeg            # decoupled, NOT scaled by lr (big_vision's AdamW)
    beta1: Decay
    beta2: Decay
    grad_clip: NonNeg
    text_loss_weight: NonNeg
    cfg_drop_prob: Frac             # condition replaced by [NOLABEL]
    flow_pretrain_steps: Count      # >0: two-stage ablation (flow alone vs N(0,I), then frozen)
    seed: Int
    checkpoint_every: PosInt
    log_every: PosInt
    sample_every: Count             # 0 = only at the end
    sample_prompts: Count
    sample_cfg_scale: NonNeg
    sample_temperature: PosNum
    val_images: Count
    num_workers: PosInt
    loader_workers: Count           # DataLoader processes per training worker (0 = in-process)
    loader_prefetch: PosInt
    compile: Bool
    use_gpu: GpuChoice
    ray_address: Str                # "" = $RAY_ADDRESS or a local Ray
    max_failures: Count
    storage_dir: Str
    out_dir: Str
    noise: NoiseConfig

    def check(self) -> None:
        _require(self.batch_size % self.num_workers == 0, "train.batch_size", self.batch_size,
                 f"global batch must be divisible by train.num_workers={self.num_workers}")
        _require(self.flow_pretrain_steps < self.steps, "train.flow_pretrain_steps",
                 self.flow_pretrain_steps, f"must be < train.steps={self.steps}")
        self.noise.check()


@section
class MLflowConfig:
    tracking_uri: Str               # "" = $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db
    experiment: Str
    run_name: Str                   # "" = derived from the config hash


@section
class EvalConfig:
    num_samples: Count              # generated images for FID/PR/KID and attribute accuracy
    cfg_scale: NonNeg
    temperature: PosNum
    t2i_cfg_scale: Num              # the size's text-to-image settings (paper App. C)
    t2i_temperature: Num
    batch_size: PosInt
    judge_steps: Count
    judge_min_accuracy: Frac
    judge_path: Str                 # domain judge of ablate/sweep ("" = models/judge.pt)
    feature_extractor: Literal["auto", "domain", "inception"]
    inception_weights: Str          # torch-fidelity inception weights, "" = download
    finetune_steps: Count           # captioning / VQA fine-tuning
    finetune_lr: PosNum
    max_decode_len: PosInt
    num_nll_images: Count
    class_prompt: Str               # text asking a multimodal model for a class sample
    zeroshot_prompts: Prompts       # class score = log sum_t p(template_t(name) | image)

    def check(self) -> None:
        for key, templates in (("eval.class_prompt", [self.class_prompt]),
                               ("eval.zeroshot_prompts", self.zeroshot_prompts)):
            for text in templates:
                _require(text.count("{}") == 1, key, text,
                         "must contain '{}' exactly once (where the class name goes)")


@section
class TuneConfig:
    num_samples: PosInt
    max_concurrent_trials: PosInt
    cpus_per_trial: PosInt
    gpus_per_trial: NonNeg
    storage_dir: Str


@section
class Config:
    seed: Int
    data: DataConfig
    tokenizer: TokenizerConfig
    pca: PCAConfig
    model: ModelConfig
    train: TrainConfig
    mlflow: MLflowConfig
    eval: EvalConfig
    tune: TuneConfig

    def check(self) -> None:
        """The rules between sections (each section's own rules: its `check`)."""
        m, t = self.model, self.train
        self.data.synthetic.check()
        m.check()
        t.check()
        self.eval.check()
        res, p = self.data.resolution, m.patch_size
        _require(res % p == 0, "data.resolution", res,
                 f"image size must be divisible by model.patch_size={p}")
        _require(m.factoring != "no_flow" or not t.flow_pretrain_steps,
                 "train.flow_pretrain_steps", t.flow_pretrain_steps,
                 "two-stage training needs a flow (model.factoring != no_flow)")
        _require(m.factoring != "pca" or self.pca.enabled, "pca.enabled", self.pca.enabled,
                 "model.factoring='pca' needs the fit_pca stage (pca.enabled: true)")
        _require((t.task == "class") == (m.conditioning == "class"), "train.task", t.task,
                 f"task '{t.task}' does not match model.conditioning '{m.conditioning}' "
                 "(use task 'class' exactly with conditioning 'class')")
        _check_roles(self.data, m.conditioning)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flat `{"train.lr": 1e-3, ...}` view, e.g. for MLflow params."""
        return flatten(self.to_dict())

    def hash(self, sections: tuple[str, ...] | None = None, n: int = 10) -> str:
        """Stable short hash of (some sections of) the config; names Ray runs (a changed
        config must never silently resume an old run)."""
        d = self.to_dict()
        if sections is not None:
            d = {k: d[k] for k in sections}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:n]

    @property
    def num_image_tokens(self) -> int:
        return (self.data.resolution // self.model.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """3p^2: dims of one flattened patch."""
        return 3 * self.model.patch_size ** 2


# ----------------------------------------------------------------------------- data roles
ROLES = ("pretrain", "caption", "vqa", "zeroshot", "fid")
PRETRAIN_SOURCES = ("synthetic", "imagefolder", "coco")
ROLE_SOURCES = {"caption": ("synthetic", "coco"), "vqa": ("synthetic", "vqav2"),
                "zeroshot": ("synthetic", "imagefolder"), "fid": PRETRAIN_SOURCES}
# what each source kind holds per image (the shapes world has everything)
SOURCE_PROVIDES = {"synthetic": ("captions", "labels", "qa", "attributes"),
                   "imagefolder": ("labels",), "coco": ("captions",), "vqav2": ("qa",)}
_SOURCE_PATHS = {"imagefolder": ("train_images", "val_images"),
                 "coco": ("train_images", "val_images", "train_annotations", "val_annotations"),
                 "vqav2": ("train_images", "val_images", "train_questions", "val_questions",
                           "train_annotations", "val_annotations")}


def source_configured(d: DataConfig, source: str) -> bool:
    """Every path of `data.<source>` is set (the synthetic world is always there)."""
    if source == "synthetic":
        return True
    section = getattr(d, source)
    return all(getattr(section, k) for k in _SOURCE_PATHS[source])


def role_source(d: DataConfig, role: str) -> str:
    """The source kind feeding `role`, `auto` resolved; "none" = the role is not served.

    auto: the shapes world fills every role; otherwise the FID reference set is the
    pretraining source, captioning uses COCO (the pretraining source when it has captions),
    VQA uses VQAv2 and zero-shot an ImageFolder with class names, each when configured."""
    if role == "pretrain":
        return d.source
    if role not in ROLE_SOURCES:
        raise ValueError(f"unknown data role {role!r}; roles: {list(ROLES)}")
    chosen = getattr(d.roles, role).source
    if chosen != "auto":
        return chosen
    if d.source == "synthetic" or role == "fid":
        return d.source
    if role == "caption":
        return "coco" if d.source == "coco" or source_configured(d, "coco") else "none"
    if role == "vqa":
        return "vqav2" if source_configured(d, "vqav2") else "none"
    ok = source_configured(d, "imagefolder") and d.imagefolder.class_names
    return "imagefolder" if ok else "none"


def role_prepared_dir(d: DataConfig, role: str) -> str:
    """Where `prepare@<role>` writes (pretraining: `data.prepared_dir`)."""
    return d.prepared_dir if role == "pretrain" else getattr(d.roles, role).prepared_dir


def role_config(cfg: Config, role: str) -> Config:
    """`cfg` with `data.source` / `data.prepared_dir` set to `role`'s (what `prepare` reads)."""
    data = dataclasses.replace(cfg.data, source=role_source(cfg.data, role),
                               prepared_dir=role_prepared_dir(cfg.data, role))
    return dataclasses.replace(cfg, data=data)


def _check_roles(d: DataConfig, conditioning: str) -> None:
    """Sources per role: each role's source must hold what its stages need (paper §4 setup)."""
    _require(d.source != "vqav2", "data.source", d.source,
             "VQAv2 holds questions, no captions or labels, so it cannot be the pretraining "
             "source; pretrain on synthetic | coco (text) or imagefolder (class) and set "
             "data.roles.vqa.source=vqav2 for the VQA fine-tune and evaluation")
    _require(d.source in PRETRAIN_SOURCES, "data.source", d.source,
             f"the pretraining source must be one of {list(PRETRAIN_SOURCES)}")
    need = "captions" if conditioning == "text" else "labels"
    fix = "coco or synthetic" if need == "captions" else "imagefolder or synthetic"
    _require(need in SOURCE_PROVIDES[d.source], "data.source", d.source,
             f"a {conditioning}-conditioned model (model.conditioning={conditioning!r}) "
             f"pretrains on images with {need}; '{d.source}' has none (use {fix})")
    dirs = {"data.prepared_dir": d.prepared_dir}
    for role, choices in ROLE_SOURCES.items():
        r, key = getattr(d.roles, role), f"data.roles.{role}"
        allowed = ("auto", "none", *choices) if role != "fid" else ("auto", *choices)
        _require(r.source in allowed, f"{key}.source", r.source,
                 f"must be one of {list(allowed)}")
        _require(bool(r.prepared_dir), f"{key}.prepared_dir", r.prepared_dir,
                 f"must be set (where prepare@{role} writes)")
        clash = [k for k, v in dirs.items() if Path(v) == Path(r.prepared_dir)]
        _require(not clash, f"{key}.prepared_dir", r.prepared_dir,
                 f"must differ from {clash[0] if clash else ''}")
        dirs[f"{key}.prepared_dir"] = r.prepared_dir
    fid, zeroshot = role_source(d, "fid"), role_source(d, "zeroshot")
    _require(conditioning != "class" or fid == d.source, "data.roles.fid.source",
             d.roles.fid.source, f"class samples follow the reference set's labels: a "
             f"class-conditional model needs the pretraining source '{d.source}' there")
    reads = zeroshot == "imagefolder" or (conditioning == "text" and fid == "imagefolder")
    role = "zeroshot" if zeroshot == "imagefolder" else "fid"
    _require(not reads or bool(d.imagefolder.class_names), "data.imagefolder.class_names",
             d.imagefolder.class_names, f"data.roles.{role} reads the ImageFolder source and "
             "scores/prompts class names, but its directories are ids (ImageNet: n01443537): "
             "set a class-name file (e.g. ImageNet's LOC_synset_mapping.txt)")


# ----------------------------------------------------------------------------- keys that follow
# A word an overlay may write instead of a number, for a key that follows another key. It is
# resolved once every overlay and override is merged, so an ablation follows the preset beneath
# it and any --set (two_stage under `--set train.steps=2000` pretrains the flow 500 steps).
FOLLOWS = {  # key: (word, the key it follows, the value from that key's)
    "model.factored_dims": ("all", "model.patch_size", lambda p: 3 * p ** 2),   # all 3p^2 dims
    "train.flow_pretrain_steps": ("quarter", "train.steps", lambda s: s // 4),
    "train.noise.sigma0": ("sigma_final", "train.noise.sigma_final", lambda s: s),
    "eval.cfg_scale": ("t2i", "eval.t2i_cfg_scale", lambda s: s),
    "eval.temperature": ("t2i", "eval.t2i_temperature", lambda s: s),
}


def resolve_follows(merged: dict) -> dict:
    """`merged` with each word of FOLLOWS replaced by its value."""
    flat, out = flatten(merged), copy.deepcopy(merged)
    for key, (word, ref, value_of) in FOLLOWS.items():
        if flat.get(key) != word:
            continue
        v = flat.get(ref)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"key '{key}' = {word!r} follows '{ref}', which must be a number, "
                              f"got {v!r}")
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value_of(v)
    return out


# ----------------------------------------------------------------------------- loading
def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flat_get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, ValueError, RecursionError) as e:   # ValueError: 5000-digit ints
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """`train.noise.sigma0=32` -> {"train": {"noise": {"sigma0": 32}}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"override {text!r}: the value of '{key.strip()}' is not valid YAML "
                          f"({' '.join(str(e).split())})") from None
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def resolve_overlay(name_or_path: str | Path) -> Path:
    """An overlay is a YAML path, or a preset/ablation name under `experiments/`."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"overlay file not found: {p}")
        return p
    for d in (PRESETS_DIR, ABLATIONS_DIR):
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    known = sorted(x.stem for d in (PRESETS_DIR, ABLATIONS_DIR) if d.is_dir()
                   for x in d.glob("*.yaml"))
    raise ConfigError(f"unknown preset/ablation {str(name_or_path)!r}; known: {known}")


def _check_keys(data: Any, cls: type, source: str, prefix: str = "") -> dict:
    """One file's keys against the schema, before merging (so the error names the file); an
    empty section (`train:`) changes nothing."""
    where = prefix.rstrip(".") or "<root>"
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{where}' must be a mapping, got {data!r}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types), key=repr)       # YAML keys may be ints, None, ...
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' "
                          f"(valid keys in '{where}': {sorted(types)})")
    return {k: _check_keys(v, types[k], source, f"{prefix}{k}.")
            if dataclasses.is_dataclass(types[k]) else v for k, v in data.items()}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=2)
def _read_defaults(path: Path, stamp: tuple) -> dict:
    return _check_keys(read_yaml(path), Config, str(path))


def _defaults() -> dict:
    """The repository's params.yaml, where every default lives (re-read when it changes)."""
    if not DEFAULTS.is_file():
        return {}
    st = DEFAULTS.stat()
    return _read_defaults(DEFAULTS, (st.st_mtime_ns, st.st_size))


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(Config)


def _build(merged: dict, source: str) -> Config:
    """Types and ranges (pydantic), then the cross-field rules; errors name file, key, value."""
    try:
        cfg = _adapter().validate_python(merged)
        cfg.check()
        return cfg
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if isinstance(p, str))
        if err["type"] == "missing":
            raise ConfigError(f"{source}: key '{key}' is missing (params.yaml states every "
                              "key)") from None
        msg = err["msg"].replace("Input should be", "must be").removeprefix("Value error, ")
        raise ConfigError(f"{source}: key '{key}' = {err['input']!r}: {msg}") from None
    except _Broken as e:
        key, value, msg = e.args
        raise ConfigError(f"{source}: key '{key}' = {value!r}: {msg}") from None


def load_config_dict(params: str | Path | dict | None = "params.yaml",
                     overlays: typing.Sequence[str | Path] = (),
                     overrides: typing.Sequence[str] = ()) -> dict:
    """The merged raw dict: the repository's params.yaml, then `params` (a file, a dict, or
    None for nothing more), overlays and overrides, each file's keys checked, FOLLOWS words
    resolved; leaves not yet validated."""
    layers = [] if params is None else [
        (copy.deepcopy(params), "<params>") if isinstance(params, dict)
        else (read_yaml(params), str(params))]
    for ov in overlays:
        path = resolve_overlay(ov)
        layers.append((read_yaml(path), str(path)))
    layers += [(parse_override(text), f"override {text!r}") for text in overrides]
    merged = _defaults()
    for data, source in layers:
        merged = deep_merge(merged, _check_keys(data, Config, source))
    return resolve_follows(merged)


def load_config(params: str | Path | dict | None = "params.yaml",
                overlays: typing.Sequence[str | Path] = (),
                overrides: typing.Sequence[str] = ()) -> Config:
    """Load, merge and validate. Raises ConfigError naming the key and value on any problem."""
    merged = load_config_dict(params, overlays, overrides)
    source = "<params>" if isinstance(params, dict) else str(params or DEFAULTS)
    if overlays or overrides:
        source += " + " + ", ".join([str(o) for o in overlays] + list(overrides))
    return _build(merged, source)


def _upgrade(d: dict) -> dict:
    """Configs stored by older versions: `eval.zeroshot_prompt` (one template) became
    `eval.zeroshot_prompts` (a list)."""
    ev = d.get("eval")
    if isinstance(ev, dict) and "zeroshot_prompt" in ev:
        d = {**d, "eval": {k: v for k, v in ev.items() if k != "zeroshot_prompt"}}
        d["eval"].setdefault("zeroshot_prompts", [ev["zeroshot_prompt"]])
    return d


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    merged = deep_merge(_defaults(), _check_keys(_upgrade(d), Config, "<dict>"))
    return _build(merged, "<dict>")
