"""The domain judge: a small CNN that reads scene attributes off an image.

Trained in its own stage on prepared *real* training images to predict the main object's
shape and colour and the object count (or only the class label for sources without scene
attributes). Two uses:
  - its penultimate features replace Inception for FID / precision / recall / KID on the
    offline default data (registered with torch-fidelity as `JUDGE_EXTRACTOR`);
  - its predictions give the attribute accuracy of generated images (does the sample show
    the shape / colour / count its caption or class asked for?).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetformer.safe_io import atomic_torch_save

JUDGE_EXTRACTOR = "jetformer-judge"   # torch-fidelity feature extractor name
FEATURES = "judge_features"           # its only feature layer


def scene_targets(item: dict) -> dict[str, str]:
    """What the judge predicts for one dataset item: main shape / colour and count from the
    scene attributes when the source has them, else the class label."""
    attrs = item.get("attributes") or {}
    objects = attrs.get("objects") or []
    if objects:
        return {"shape": str(objects[0]["shape"]), "color": str(objects[0]["color"]),
                "count": str(attrs.get("count", len(objects)))}
    return {"label": str(int(item["label"]))}


def build_vocab(targets: list[dict[str, str]]) -> dict[str, list[str]]:
    """{head: sorted values} over the training targets."""
    if not targets:
        raise ValueError("judge: no training targets")
    heads = sorted(targets[0])
    return {h: sorted({t[h] for t in targets}) for h in heads}


def encode_targets(targets: list[dict[str, str]], vocab: dict[str, list[str]]
                   ) -> dict[str, torch.Tensor]:
    """Value strings -> class indices per head; -1 for a value the judge never saw."""
    index = {h: {v: i for i, v in enumerate(vals)} for h, vals in vocab.items()}
    return {h: torch.tensor([index[h].get(t[h], -1) for t in targets], dtype=torch.long)
            for h in vocab}


class Judge(nn.Module):
    """conv stack -> 2x2 pooled map -> `feature_dim` features (penultimate) -> one head per
    attribute."""

    def __init__(self, vocab: dict[str, list[str]], resolution: int, width: int = 32,
                 feature_dim: int = 64):
        super().__init__()
        self.vocab, self.resolution = vocab, resolution
        self.width, self.feature_dim = width, feature_dim
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(*block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
                                  *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 2),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.to_features = nn.Sequential(nn.Linear(16 * w, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({h: nn.Linear(feature_dim, len(v)) for h, v in vocab.items()})

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] (torch-fidelity layout) or [B,H,W,3] -> float [B,3,R,R] in [-1, 1]."""
        if images.dim() != 4:
            raise ValueError(f"judge: expected a 4-d image batch, got shape {tuple(images.shape)}")
        if images.shape[1] != 3 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_features(self.body(self._prepare(images)))     # [B, F]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {h: head(f) for h, head in self.heads.items()}         # {head: [B, n_values]}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Predicted value strings per head."""
        self.eval()
        device = next(self.parameters()).device
        out = {h: [] for h in self.vocab}
        for i in range(0, len(images), batch_size):
            logits = self(images[i:i + batch_size].to(device))
            for h, lg in logits.items():
                out[h].extend(self.vocab[h][j] for j in lg.argmax(-1).tolist())
        return out

    def config(self) -> dict:
        return {"vocab": self.vocab, "resolution": self.resolution, "width": self.width,
                "feature_dim": self.feature_dim}


def train_judge(images: torch.Tensor, targets: list[dict[str, str]], *, steps: int,
                batch_size: int = 64,
                lr: float = 2e-3, seed: int = 0, width: int = 16, feature_dim: int = 64,
                device: str | torch.device = "cpu", log_every: int = 100, log=print) -> Judge:
    """Train a judge on uint8 images [N,H,W,3] and their `scene_targets`. AdamW, cosine lr,
    random left-right flips (no predicted attribute depends on left/right)."""
    if len(images) != len(targets):
        raise ValueError(f"judge: {len(images)} images but {len(targets)} targets")
    vocab = build_vocab(targets)
    y = encode_targets(targets, vocab)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge(vocab, resolution=images.shape[1], width=width,
                  feature_dim=feature_dim).to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50)
        * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(steps, 1))).item()))
    judge.train()
    for step in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=g)
        x = images[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        logits = judge(x.to(device))
        loss = sum(F.cross_entropy(logits[h], y[h][idx].to(device), ignore_index=-1) for h in vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and log_every and (step % log_every == 0 or step == steps - 1):
            log(f"judge step {step + 1}/{steps} loss {loss.item():.4f}")
    return judge.eval()


def judge_accuracy(judge: Judge, images: torch.Tensor, targets: list[dict[str, str]]
                   ) -> dict[str, float]:
    """Per-head accuracy on labelled images, plus `all` (every head right)."""
    pred = judge.predict(images)
    acc = {h: sum(p == t[h] for p, t in zip(pred[h], targets)) / len(targets) for h in judge.vocab}
    acc["all"] = sum(all(pred[h][i] == targets[i][h] for h in judge.vocab)
                     for i in range(len(targets))) / len(targets)
    return acc


def save_judge(judge: Judge, path: str | Path) -> None:
    """Atomic write of weights + config."""
    atomic_torch_save({"config": judge.config(), "state_dict": judge.state_dict()}, path)


def judge_path(cfg) -> str:
    """Where the `judge` stage writes the domain feature extractor."""
    path = getattr(cfg.eval, "judge_path", "") or "models/judge.pt"   # pipelines/judge.py --out
    return str(Path(path).resolve())


class JudgeUnavailable(ValueError):
    """The judge file records that no judge could be trained (the reason is the message)."""


def judge_targets_reason(targets: list[dict[str, str]]) -> str:
    """Why these training targets cannot train a meaningful judge ("" when they can): it
    needs scene attributes or class labels with at least two values to tell apart."""
    if not targets:
        return "no training images"
    if set(targets[0]) == {"label"} and {t["label"] for t in targets} <= {"-1"}:
        return "the reference source has no class labels or scene attributes"
    if all(len({t[h] for t in targets}) < 2 for h in targets[0]):
        return "every training image has the same label/attributes: nothing to tell apart"
    return ""


def save_unavailable(reason: str, path: str | Path) -> None:
    """Write a judge file that records only why there is no judge (atomic)."""
    atomic_torch_save({"unavailable": str(reason)}, path)


def judge_unavailable(path: str | Path) -> str:
    """The reason recorded in a judge file written by `save_unavailable`, "" for a judge."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found: {path} (run the `judge` stage: dvc "
                                f"repro judge)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any corruption gets the same clear message
        raise ValueError(f"cannot load judge weights from {path}: {e}") from e
    return str(blob.get("unavailable", "")) if isinstance(blob, dict) else ""


def load_judge(path: str | Path, device: str | torch.device = "cpu") -> Judge:
    path = Path(path)
    reason = judge_unavailable(path)
    if reason:
        raise JudgeUnavailable(f"{path}: no domain judge ({reason})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        judge = Judge(**blob["config"])
        judge.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001 - any corruption gets the same clear message
        raise ValueError(f"cannot load judge weights from {path}: {e}") from e
    return judge.to(device).eval()


# ----------------------------------------------------------------------------- torch-fidelity
def register_with_torch_fidelity() -> str:
    """Register the judge as a torch-fidelity feature extractor (idempotent); returns its name.
    torch-fidelity passes `feature_extractor_weights_path` (the judge file) to the constructor."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if JUDGE_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return JUDGE_EXTRACTOR

    class JudgeFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if not feature_extractor_weights_path:
                raise ValueError("the judge feature extractor needs feature_extractor_weights_path "
                                 "(the file written by the `judge` stage)")
            self.judge = load_judge(feature_extractor_weights_path)
            self.requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return (FEATURES,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return FEATURES

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"judge extractor expects uint8 [B,3,H,W], got {x.dtype} "
                                 f"{tuple(x.shape)}")
            return (self.judge.features(x).double(),)

    torch_fidelity.register_feature_extractor(JUDGE_EXTRACTOR, JudgeFeatureExtractor)
    return JUDGE_EXTRACTOR
