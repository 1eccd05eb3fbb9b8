"""Exponential moving average of a model's weights (`model.ema_decay` > 0).

    ema <- decay * ema + (1 - decay) * weights        after every optimiser step

The official JetFormer recipe uses no EMA (big_vision `trainers/proj/jetformer/train.py` reads
`ema_decay`, default 0, and `configs/proj/jetformer/jetformer_imagenet2012.py` sets 0.0);
community re-implementations report that it helps samples. When enabled, sampling and evaluation
use the averaged weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / Ray's prepare_model wrapper


class EMA:
    """Shadow copies of every floating-point parameter of `model` (same device and dtype)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone()
                       for name, p in _unwrap(model).named_parameters() if p.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Call once after each optimiser step."""
        for name, p in _unwrap(model).named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the averages (e.g. for an exported checkpoint)."""
        params = dict(_unwrap(model).named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)

    @contextmanager
    def averaged(self, model: nn.Module):
        """Temporarily swap the averaged weights in (sampling / evaluation during training)."""
        params = dict(_unwrap(model).named_parameters())
        backup = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
