"""Typed parameters: `params.yaml` + optional overlay files, validated before any compute.

Config is plain data (big_vision style): nested dataclasses mirroring `params.yaml`.
`load_config()` merges overlays (e.g. `experiments/presets/jetformer_l.yaml`,
`experiments/ablations/no_flow.yaml`) and dotted overrides (`train.lr=3e-4`) onto the base
file, then checks every key and type and the cross-field constraints. Any problem raises
`ConfigError` naming the file, the key and the value.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import json
import math
import operator
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "experiments" / "presets"
ABLATIONS_DIR = REPO_ROOT / "experiments" / "ablations"


class ConfigError(ValueError):
    """A parameter is unknown, has the wrong type, or is inconsistent with another."""


# ----------------------------------------------------------------------------- schema
@dataclass
class SyntheticConfig:
    """The embedded procedural "shapes" world (DESIGN §4)."""
    out_dir: str = "data/raw/shapes"
    num_train: int = 5000          # `dvc repro tokenizer` (generate+prepare+tokenizer) < 1 min on 2 cores
    num_val: int = 500
    seed: int = 0
    min_side: int = 40          # raw images have random sizes in [min_side, max_side] ...
    max_side: int = 96          # ... and random aspect ratios, so resize + crop matter
    bad_files: bool = True      # write a handful of deliberately bad files per split
    world: str = "shapes"       # shapes (flat colours) | photo (photo-crop backgrounds/textures)


@dataclass
class SourcePaths:
    """Paths of a real source (COCO captions, VQAv2). Empty = unused."""
    train_images: str = ""
    val_images: str = ""
    train_annotations: str = ""     # COCO captions JSON / VQAv2 annotations JSON
    val_annotations: str = ""
    train_questions: str = ""       # VQAv2 questions JSON
    val_questions: str = ""


@dataclass
class ImageFolderPaths:
    """An ImageFolder source (ImageNet layout `<root>/<class dir>/<image>`). `class_names`: a
    file naming the classes (`jetformer.data.classnames`): one name per line in class order,
    the ImageNet synset mapping (`n01440764 tench, Tinca tinca`) or a JSON {dir: name}."""
    train_images: str = ""
    val_images: str = ""
    class_names: str = ""


@dataclass
class RoleConfig:
    """Which source feeds one role, and where its `prepare@<role>` output goes."""
    source: str = "auto"            # auto | none | a source name (choices per role: ROLE_SOURCES)
    prepared_dir: str = ""


def _role(name: str):
    return field(default_factory=lambda: RoleConfig(prepared_dir=f"data/prepared/{name}"))


@dataclass
class RolesConfig:
    """The evaluation roles' data (paper §4: pretrain on image-text pairs or ImageNet, fine-tune
    and evaluate captioning on COCO, VQA on VQAv2, zero-shot classification on ImageNet, FID
    against a reference set). `auto` is resolved by `role_source`."""
    caption: RoleConfig = _role("caption")
    vqa: RoleConfig = _role("vqa")
    zeroshot: RoleConfig = _role("zeroshot")
    fid: RoleConfig = _role("fid")


@dataclass
class DataConfig:
    source: str = "synthetic"       # the pretraining source: synthetic | imagefolder | coco
    resolution: int = 32            # shorter side resized to this, then central crop
    prepared_dir: str = "data/prepared/pretrain"   # the pretraining data (prepare@pretrain)
    workers: int = 2                # parallel prepare processes
    shard_size: int = 1000          # images per Arrow shard
    max_bad_fraction: float = 0.05  # fail if more than this fraction of files is unreadable
    min_image_side: int = 16        # files with a shorter side below this are skipped as broken
    max_images: int = 0             # 0 = all; cap per split for quick runs
    flip: bool = False              # random left-right flip in the loader (ImageNet recipe)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    imagefolder: ImageFolderPaths = field(default_factory=ImageFolderPaths)
    coco: SourcePaths = field(default_factory=SourcePaths)
    vqav2: SourcePaths = field(default_factory=SourcePaths)
    roles: RolesConfig = field(default_factory=RolesConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = 128
    model_path: str = ""            # use this sentencepiece .model instead of training one
    out_path: str = "models/tokenizer.model"
    max_text_len: int = 24          # text tokens per sequence incl. EOS (pad/truncate)


@dataclass
class PCAConfig:
    enabled: bool = False
    num_images: int = 4000          # paper: 4,000 training images
    out_path: str = "models/pca/pca.pt"   # its directory is the DVC output of fit_pca


@dataclass
class FlowConfig:
    """Jet (paper §4 'Architecture'): channel-wise affine couplings, ViT blocks predict scale/shift."""
    num_couplings: int = 32         # paper's depth; scale cap 2^(couplings/2) per dim (~9 bits needed)
    width: int = 32
    depth: int = 1                  # ViT blocks per coupling
    num_heads: int = 2
    mlp_dim: int = 64
    dropout: float = 0.0


@dataclass
class DecoderConfig:
    """Gemma-style decoder (RMSNorm, RoPE, MQA, GeGLU)."""
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 384
    dropout: float = 0.1
    rope_base: float = 10000.0


@dataclass
class ModelConfig:
    patch_size: int = 4
    factored_dims: int = 16         # d: dims per token modelled by the transformer
    # post_flow (default) | learnable_w | pca | none | no_flow   (paper Table 2)
    factoring: str = "post_flow"
    conditioning: str = "text"      # text (multimodal) | class
    num_classes: int = 0            # class-conditional only; 0 = read from the prepared data
    num_class_tokens: int = 16
    num_mixtures: int = 4           # K of the GMM head (paper 1024)
    latent_noise_max: float = 0.3   # per-example sigma ~ U(0, max) on text-first rows
    ema_decay: float = 0.0          # 0 = no EMA
    flow: FlowConfig = field(default_factory=FlowConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class NoiseConfig:
    """RGB noise curriculum (paper §3.2): sigma_t = final + (sigma0 - final)(1 + cos(pi t))/2."""
    sigma0: float = 16.0
    sigma_final: float = 0.0
    curriculum_frac: float = 0.75   # fraction of training over which sigma decays (then stays final)


@dataclass
class TrainConfig:
    task: str = "both"              # t2i | i2t | both (multimodal) | class (class-conditional)
    steps: int = 1500
    batch_size: int = 32            # global batch, split across workers
    lr: float = 1e-3
    flow_lr_scale: float = 8.0      # the flow's (codec's) learning rate = lr x this
    warmup_frac: float = 0.1
    weight_decay: float = 1e-4      # decoupled, NOT scaled by lr (official code)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    text_loss_weight: float = 0.0025
    cfg_drop_prob: float = 0.1      # condition replaced by [NOLABEL]
    flow_pretrain_steps: int = 0    # >0: two-stage ablation (flow alone vs N(0,I), then frozen)
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 10
    sample_every: int = 0           # 0 = only at the end
    sample_prompts: int = 8         # val captions/classes in each training sample grid (rows)
    sample_cfg_scale: float = 2.0   # CFG guidance of the training sample grids
    sample_temperature: float = 0.95
    val_images: int = 256           # val images for the val bits/dim / text NLL at checkpoints
    num_workers: int = 2
    loader_workers: int = 0         # DataLoader processes per training worker (0 = in-process)
    loader_prefetch: int = 2        # batches in flight per loader process
    compile: bool = False           # torch.compile the loss (forward + backward)
    use_gpu: str = "auto"           # auto | true | false
    ray_address: str = ""           # "" = $RAY_ADDRESS or a local Ray
    max_failures: int = 2
    storage_dir: str = ".ray_runs"  # Ray run dirs live outside DVC outs so resume works
    out_dir: str = "models/checkpoint"
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class MLflowConfig:
    tracking_uri: str = ""          # "" = $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db
    experiment: str = "jetformer"
    run_name: str = ""              # "" = derived from the config hash


@dataclass
class EvalConfig:
    num_samples: int = 300          # generated images for FID/PR/KID and attribute accuracy
    cfg_scale: float = 2.0
    temperature: float = 0.95
    # text-to-image sampling settings of the size (paper App. C / official T2I configs); the
    # coco_t2i/coco_ti recipes set cfg_scale/temperature to these, so the size preset wins
    t2i_cfg_scale: float = 9.0
    t2i_temperature: float = 0.96
    batch_size: int = 50
    judge_steps: int = 300
    judge_min_accuracy: float = 0.95
    judge_path: str = ""             # domain judge of ablate/sweep ("" = models/judge.pt, the
                                     # judge stage's output); e.g. a photo-world judge
    feature_extractor: str = "auto"  # auto (domain for synthetic, inception otherwise) | domain | inception
    inception_weights: str = ""      # path to torch-fidelity inception weights, "" = download
    finetune_steps: int = 200        # captioning / VQA fine-tuning
    finetune_lr: float = 3e-4
    max_decode_len: int = 24
    num_nll_images: int = 300
    class_prompt: str = "a {}"       # text asking a multimodal model for a class sample
    # zero-shot: class score = log sum over these templates of p(template(name) | image)
    zeroshot_prompts: list[str] = dataclasses.field(default_factory=lambda: [  # paper: ["{}"]
        f"a {c} {{}}" for c in ("red", "green", "blue", "yellow", "purple", "white")])


@dataclass
class TuneConfig:
    num_samples: int = 1
    max_concurrent_trials: int = 2
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    storage_dir: str = ".ray_tune"


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    # -- helpers
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


def role_config(cfg: "Config", role: str) -> "Config":
    """`cfg` with `data.source` / `data.prepared_dir` set to `role`'s (what `prepare` reads)."""
    data = dataclasses.replace(cfg.data, source=role_source(cfg.data, role),
                               prepared_dir=role_prepared_dir(cfg.data, role))
    return dataclasses.replace(cfg, data=data)


VALID_CHOICES = {
    "data.synthetic.world": ("shapes", "photo"),
    "model.factoring": ("post_flow", "learnable_w", "pca", "none", "no_flow"),
    "model.conditioning": ("text", "class"),
    "train.task": ("t2i", "i2t", "both", "class"),
    "train.use_gpu": ("auto", "true", "false"),
    "eval.feature_extractor": ("auto", "domain", "inception"),
}


# ----------------------------------------------------------------------------- building
def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce/verify one leaf value against its annotated type."""
    def bad(expected: str):
        return ConfigError(f"{source}: key '{key}' expects {expected}, got {value!r} "
                           f"({type(value).__name__})")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        try:
            value = float(value)
        except OverflowError:       # an integer beyond the float range
            raise bad("a finite number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise bad("a non-empty list of strings")
        return list(value)
    if tp is str:
        if isinstance(value, bool) and key == "train.use_gpu":  # YAML true/false
            return "true" if value else "false"
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise ConfigError(f"{source}: unsupported type for '{key}'")  # schema bug


def _build(cls, data: Any, prefix: str, source: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=repr)   # keys may be ints, None, ... in YAML
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' "
                          f"(valid keys in '{prefix.rstrip('.') or '<root>'}': {sorted(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key + ".", source)
        else:
            kwargs[name] = _check_value(data[name], tp, key, source)
    return cls(**kwargs)


def _check_keys(overlay: dict, cls, prefix: str, source: str) -> None:
    """Fail on overlay keys that do not exist in the schema (before merging)."""
    _build(cls, _strip_leaves(overlay, cls), prefix, source)


def _strip_leaves(d: dict, cls) -> dict:
    # keep structure (to detect unknown keys) but check leaves later, after merging
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in d.items():
        tp = hints.get(k)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            out[k] = _strip_leaves(v, tp)
        elif tp in (int, float) and is_derived(v):
            out[k] = tp(0)  # a derived value: its type is checked once it is computed
        else:
            out[k] = v
    return out


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------- derived values
def _bounded_pow(a, b):
    """`a ** b`, refusing integer powers beyond 1000 bits (`10 ** 10 ** 10` would not end)."""
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0 \
            and b * abs(a).bit_length() > 1000:
        raise OverflowError(f"{a} ** {b} is too large")
    return a ** b


_DERIVED_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                ast.Pow: _bounded_pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
_DERIVED_FUNCS = {"min": min, "max": max, "round": round, "int": int}


def is_derived(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("=")


def _leaf_types(cls, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def resolve_derived(merged: dict) -> dict:
    """Compute derived values once every overlay is merged, so an overlay can depend on the
    preset beneath it. A number written as `"= <expression>"` is computed from other keys:
    `factored_dims: "= 3 * model.patch_size ** 2"` (no factoring: all 3p^2 dims, whatever p),
    `flow_pretrain_steps: "= train.steps // 4"`. Expressions use numbers, dotted keys (possibly
    derived themselves), + - * / // % ** and min/max/round/int."""
    types = _leaf_types(Config)
    flat_all = flatten(deep_merge(Config().to_dict(), merged))
    resolved: dict[str, Any] = {}

    def value_of(key: str, stack: tuple[str, ...]) -> Any:
        if key not in flat_all:
            raise ConfigError(f"derived value of '{stack[-1]}' refers to unknown key '{key}'")
        value = flat_all[key]
        if types.get(key) not in (int, float) or not is_derived(value):
            return value
        if key in stack:
            raise ConfigError(f"derived values form a cycle: {' -> '.join(stack + (key,))}")
        if key not in resolved:
            resolved[key] = _eval_derived(key, value, lambda k: value_of(k, stack + (key,)),
                                          types[key])
        return resolved[key]

    for key in flat_all:
        value_of(key, ())
    out = copy.deepcopy(merged)
    for key, value in resolved.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def _eval_derived(key: str, text: str, lookup, tp) -> int | float:
    expr = text.lstrip()[1:].strip()

    def fail(msg: str):
        return ConfigError(f"key '{key}' = {text!r}: {msg}")

    def dotted(node) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            head = dotted(node.value)
            return None if head is None else f"{head}.{node.attr}"
        return None

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _DERIVED_OPS:
            return _DERIVED_OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _DERIVED_OPS:
            return _DERIVED_OPS[type(node.op)](ev(node.operand))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _DERIVED_FUNCS and not node.keywords):
            return _DERIVED_FUNCS[node.func.id](*[ev(a) for a in node.args])
        name = dotted(node)
        if name is not None:
            v = lookup(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise fail(f"'{name}' = {v!r} is not a number")
            return v
        raise fail(f"unsupported expression {ast.unparse(node)!r} (numbers, dotted keys, "
                   "+ - * / // % **, min/max/round/int)")

    try:
        result = ev(ast.parse(expr, mode="eval").body)
    except SyntaxError:
        raise fail("not a valid expression") from None
    except (ArithmeticError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise fail(str(e)) from None
    if isinstance(result, complex) or (isinstance(result, int) and result.bit_length() > 1000):
        raise fail("evaluates to a complex or too large number")
    if not math.isfinite(result):
        raise fail(f"evaluates to {result}, not a finite number")
    if tp is int:
        if isinstance(result, float) and not result.is_integer():
            raise fail(f"evaluates to {result}, but the key expects an integer")
        return int(result)
    try:
        return float(result)
    except OverflowError:
        raise fail("evaluates to a number beyond the float range") from None


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
    known = sorted(x.stem for d in (PRESETS_DIR, ABLATIONS_DIR) if d.is_dir() for x in d.glob("*.yaml"))
    raise ConfigError(f"unknown preset/ablation {str(name_or_path)!r}; known: {known}")


def load_config_dict(params: str | Path | dict | None = "params.yaml",
                     overlays: typing.Sequence[str | Path] = (),
                     overrides: typing.Sequence[str] = ()) -> dict:
    """The merged raw dict (keys checked per overlay, leaves not yet validated)."""
    if params is None:
        merged: dict = {}
    elif isinstance(params, dict):
        merged = copy.deepcopy(params)
    else:
        merged = read_yaml(params)
    _check_keys(merged, Config, "", str(params) if not isinstance(params, dict) else "<params>")
    for ov in overlays:
        path = resolve_overlay(ov)
        data = read_yaml(path)
        _check_keys(data, Config, "", str(path))
        merged = deep_merge(merged, data)
    for text in overrides:
        data = parse_override(text)
        _check_keys(data, Config, "", f"override {text!r}")
        merged = deep_merge(merged, data)
    return resolve_derived(merged)


def load_config(params: str | Path | dict | None = "params.yaml",
                overlays: typing.Sequence[str | Path] = (),
                overrides: typing.Sequence[str] = ()) -> Config:
    """Load, merge and validate. Raises ConfigError naming the key and value on any problem."""
    merged = load_config_dict(params, overlays, overrides)
    source = str(params) if isinstance(params, (str, Path)) else "<params>"
    if overlays or overrides:
        source += " + " + ", ".join([str(o) for o in overlays] + list(overrides))
    cfg = _build(Config, merged, "", source)
    validate(cfg, source)
    return cfg


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
    cfg = _build(Config, _upgrade(d), "", "<dict>")
    validate(cfg, "<dict>")
    return cfg


# ----------------------------------------------------------------------------- validation
def validate(cfg: Config, source: str = "<params>") -> None:
    flat = cfg.flat()

    def fail(key: str, msg: str):
        raise ConfigError(f"{source}: key '{key}' = {flat.get(key)!r}: {msg}")

    for key, choices in VALID_CHOICES.items():
        if flat[key] not in choices:
            fail(key, f"must be one of {list(choices)}")
    _validate_data(cfg, fail)

    positive_int = ["data.resolution", "data.workers", "data.shard_size", "tokenizer.vocab_size",
                    "tokenizer.max_text_len", "model.patch_size", "model.num_class_tokens",
                    "model.num_mixtures", "model.flow.width", "model.flow.num_heads",
                    "model.flow.mlp_dim", "model.decoder.width", "model.decoder.depth",
                    "model.decoder.num_heads", "model.decoder.head_dim", "model.decoder.mlp_dim",
                    "train.steps", "train.batch_size", "train.num_workers", "train.checkpoint_every",
                    "train.loader_prefetch",
                    "train.log_every", "eval.batch_size", "eval.max_decode_len",
                    "data.synthetic.num_train", "data.synthetic.num_val", "data.min_image_side", "tune.cpus_per_trial",
                    "tune.max_concurrent_trials", "tune.num_samples"]
    for key in positive_int:
        if flat[key] <= 0:
            fail(key, "must be > 0")
    non_negative = ["model.flow.num_couplings", "model.flow.depth", "model.num_classes",
                    "model.ema_decay", "model.latent_noise_max", "train.flow_pretrain_steps",
                    "train.max_failures", "train.sample_every", "train.sample_prompts", "train.val_images",
                    "train.sample_cfg_scale", "train.noise.sigma0", "train.loader_workers",
                    "train.noise.sigma_final", "train.weight_decay", "train.grad_clip",
                    "data.max_images", "eval.num_samples", "eval.cfg_scale", "eval.judge_steps",
                    "eval.finetune_steps", "eval.num_nll_images", "pca.num_images",
                    "train.text_loss_weight", "tune.gpus_per_trial"]
    for key in non_negative:
        if flat[key] < 0:
            fail(key, "must be >= 0")
    for key in ["train.lr", "train.flow_lr_scale", "train.sample_temperature", "eval.temperature", "eval.finetune_lr", "model.decoder.rope_base"]:
        if not flat[key] > 0:
            fail(key, "must be > 0")
    for key in ["train.warmup_frac", "train.cfg_drop_prob", "data.max_bad_fraction",
                "model.flow.dropout", "model.decoder.dropout", "train.noise.curriculum_frac",
                "eval.judge_min_accuracy"]:
        if not 0.0 <= flat[key] <= 1.0:
            fail(key, "must be in [0, 1]")
    for key in ["model.ema_decay", "train.beta1", "train.beta2"]:
        if not 0.0 <= flat[key] < 1.0:
            fail(key, "must be in [0, 1)")

    m, d, t = cfg.model, cfg.data, cfg.train
    if d.resolution % m.patch_size:
        fail("data.resolution", f"image size must be divisible by model.patch_size={m.patch_size}")
    if m.factored_dims <= 0 or m.factored_dims > 3 * m.patch_size ** 2:
        fail("model.factored_dims", f"must be in [1, 3*patch_size^2 = {3 * m.patch_size ** 2}]")
    if m.factoring in ("none", "no_flow") and m.factored_dims != 3 * m.patch_size ** 2:
        fail("model.factored_dims", f"factoring='{m.factoring}' models all dims: must equal "
             f"3*patch_size^2 = {3 * m.patch_size ** 2}")
    if m.factoring in ("learnable_w", "pca") and m.factored_dims < 2:
        fail("model.factored_dims", f"factoring='{m.factoring}' runs the flow on d dims: needs d >= 2")
    if m.factoring == "no_flow" and t.flow_pretrain_steps:
        fail("train.flow_pretrain_steps", "two-stage training needs a flow (model.factoring != no_flow)")
    if m.factoring == "pca" and not cfg.pca.enabled:
        fail("pca.enabled", "model.factoring='pca' needs the fit_pca stage (pca.enabled: true)")
    if m.factoring != "no_flow":
        if m.flow.num_couplings <= 0:
            fail("model.flow.num_couplings", "a flow needs at least one coupling")
        if m.flow.width % m.flow.num_heads:
            fail("model.flow.width", f"must be divisible by model.flow.num_heads={m.flow.num_heads}")
    if m.decoder.width % m.decoder.num_heads and m.decoder.num_heads * m.decoder.head_dim <= 0:
        fail("model.decoder.width", "inconsistent with num_heads")
    if m.decoder.head_dim % 2:
        fail("model.decoder.head_dim", "RoPE needs an even head_dim")
    if (t.task == "class") != (m.conditioning == "class"):
        fail("train.task", f"task '{t.task}' does not match model.conditioning '{m.conditioning}' "
             "(use task 'class' exactly with conditioning 'class')")
    if t.batch_size % t.num_workers:
        fail("train.batch_size", f"global batch must be divisible by train.num_workers={t.num_workers}")
    if t.flow_pretrain_steps >= t.steps:
        fail("train.flow_pretrain_steps", f"must be < train.steps={t.steps}")
    if t.noise.sigma_final > t.noise.sigma0:
        fail("train.noise.sigma_final", f"must be <= train.noise.sigma0={t.noise.sigma0}")
    for key, templates in (("eval.class_prompt", [cfg.eval.class_prompt]),
                           ("eval.zeroshot_prompts", cfg.eval.zeroshot_prompts)):
        for text in templates:
            if text.count("{}") != 1:
                fail(key, f"{text!r} must contain '{{}}' exactly once (where the class name goes)")
    if d.synthetic.min_side > d.synthetic.max_side:
        fail("data.synthetic.min_side", f"must be <= data.synthetic.max_side={d.synthetic.max_side}")


def _validate_data(cfg: Config, fail) -> None:
    """Sources per role: each role's source must hold what its stages need (paper §4 setup)."""
    d, conditioning = cfg.data, cfg.model.conditioning
    if d.source == "vqav2":
        fail("data.source", "VQAv2 holds questions, no captions or labels, so it cannot be the "
             "pretraining source; pretrain on synthetic | coco (text) or imagefolder (class) and "
             "set data.roles.vqa.source=vqav2 for the VQA fine-tune and evaluation")
    if d.source not in PRETRAIN_SOURCES:
        fail("data.source", f"the pretraining source must be one of {list(PRETRAIN_SOURCES)}")
    need = "captions" if conditioning == "text" else "labels"
    if need not in SOURCE_PROVIDES[d.source]:
        fix = ("coco or synthetic" if need == "captions" else "imagefolder or synthetic")
        fail("data.source", f"a {conditioning}-conditioned model (model.conditioning="
             f"{conditioning!r}) pretrains on images with {need}; '{d.source}' has none "
             f"(use {fix})")
    for role, choices in ROLE_SOURCES.items():
        key = f"data.roles.{role}.source"
        allowed = ("auto", "none", *choices) if role != "fid" else ("auto", *choices)
        if flat_get(cfg, key) not in allowed:
            fail(key, f"must be one of {list(allowed)}")
    dirs = {"data.prepared_dir": d.prepared_dir}
    for role in ROLE_SOURCES:
        key = f"data.roles.{role}.prepared_dir"
        path = getattr(d.roles, role).prepared_dir
        if not path:
            fail(key, "must be set (where prepare@" + role + " writes)")
        clash = [k for k, v in dirs.items() if Path(v) == Path(path)]
        if clash:
            fail(key, f"must differ from {clash[0]}")
        dirs[key] = path
    fid = role_source(d, "fid")
    if conditioning == "class" and fid != d.source:
        fail("data.roles.fid.source", f"class samples follow the reference set's labels: a "
             f"class-conditional model needs the pretraining source '{d.source}' there")
    zeroshot = role_source(d, "zeroshot")
    if "imagefolder" in (zeroshot, fid if conditioning == "text" else "") \
            and not d.imagefolder.class_names:
        role = "zeroshot" if zeroshot == "imagefolder" else "fid"
        fail("data.imagefolder.class_names", f"data.roles.{role} reads the ImageFolder source "
             f"and scores/prompts class names, but its directories are ids (ImageNet: "
             "n01443537): set a class-name file (e.g. ImageNet's LOC_synset_mapping.txt)")


def flat_get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
