"""Optimiser, learning-rate schedule and gradient clipping (paper §4, training details;
big_vision `configs/proj/jetformer/jetformer_imagenet2012.py`: `optax_name`, `lr`, `wd`,
`wd_mults`, `schedule`, `grad_clip_norm`).

Adam(β1, β2 = 0.95), linear warm-up then cosine decay to 0, global-norm clipping at 1.0, and a
decoupled weight decay of 1e-4 that is *not* scaled by the learning rate, on weight matrices only.
torch's AdamW applies `p -= lr_t · wd · p`; the official update is `p -= (lr_t / lr) · 1e-4 · p`
(the decay follows the schedule's shape, not its size), hence `wd = weight_decay / lr`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_frac: float) -> float:
    """Learning rate of update `step` (0-based) out of `total_steps`.

    Warm-up: `base_lr · (step + 1) / W` for the first `W = round(warmup_frac · total_steps)`
    updates; then `base_lr · (1 + cos(π · (step − W) / (total_steps − W))) / 2`.
    """
    if total_steps <= 0:
        raise ValueError(f"lr_at: total_steps must be > 0, got {total_steps}")
    warmup = int(round(warmup_frac * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def decayed_parameters(model: nn.Module) -> set[int]:
    """ids of the weight matrices of every `nn.Linear` (the official code decays `kernel`s only:
    no biases, norms, embeddings or positional embeddings)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}


def build_optimizer(model: nn.Module, train_cfg, params=None) -> torch.optim.AdamW:
    """AdamW over `params` (default: every trainable parameter of `model`): weight matrices with
    `weight_decay / lr`, everything else without decay; the flow's parameters (`model.codec`,
    when there is one) at `lr x flow_lr_scale`. The flow must expand the dequantisation noise of
    flat patches ~2^9-fold (log-det ~9 bits/dim) through 2*sigmoid scales whose raw values Adam
    moves by about lr per update, so on a short budget its learning rate bounds the bits/dim."""
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters")
    decay_ids = decayed_parameters(model)
    codec = getattr(model, "codec", None)
    flow_ids = {id(p) for p in codec.parameters()} if isinstance(codec, nn.Module) else set()
    groups = []
    for is_flow, lr in ((False, train_cfg.lr), (True, train_cfg.lr * train_cfg.flow_lr_scale)):
        mine = [p for p in params if (id(p) in flow_ids) == is_flow]
        # decoupled decay relative to the schedule's shape: wd / lr of this group (module doc)
        groups += [{"params": [p for p in mine if id(p) in decay_ids], "lr": lr,
                    "weight_decay": train_cfg.weight_decay / lr},
                   {"params": [p for p in mine if id(p) not in decay_ids], "lr": lr,
                    "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.lr,
                             betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_at` as a LambdaLR (its state — the update count — goes into checkpoints)."""
    base = train_cfg.lr  # LambdaLR scales every group's own initial lr by this factor

    def factor(step: int) -> float:
        return lr_at(step, base_lr=base, total_steps=total_steps,
                     warmup_frac=train_cfg.warmup_frac) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0 = no clipping); returns the norm before
    clipping (logged: a flow that trains with norms of 1000+ against a clip of 1 is broken)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))
