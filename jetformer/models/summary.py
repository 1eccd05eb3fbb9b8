"""Parameter counts of a configuration, built on the meta device (no weights are allocated, so
JetFormer-L's 2.7B parameters cost nothing): `python -m jetformer info --preset jetformer_l --json`.
"""
from __future__ import annotations

import json

import torch

from jetformer.config import Config, load_config


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: Config, vocab_size: int | None = None,
                     num_classes: int | None = None) -> dict:
    """`params_total` and its breakdown: `params_flow` (the flow and any learnable patch map W),
    `params_transformer` (decoder blocks + final norm), `params_gmm_head`, `params_text_head`,
    `params_embeddings` (text / class tables and the image-token input Dense). The parts sum
    to the total. Sizes default to `tokenizer.vocab_size` and `model.num_classes` (1 if unset)."""
    from jetformer.models.jetformer import JetFormer  # heavy import kept out of `cli` start-up

    vocab_size = vocab_size or cfg.tokenizer.vocab_size
    num_classes = num_classes or cfg.model.num_classes or 1
    with torch.device("meta"):
        model = JetFormer.from_config(
            cfg, vocab_size=vocab_size,
            num_classes=num_classes if cfg.model.conditioning == "class" else 0)
    counts = {
        "params_flow": _count(model.codec),
        "params_transformer": _count(model.decoder),
        "params_gmm_head": _count(model.gmm_head),
        "params_text_head": _count(model.text_head),
        "params_embeddings": (_count(model.text_embed) + _count(model.image_embed)
                              + _count(getattr(model, "class_embed", None))),
    }
    total = _count(model)
    if sum(counts.values()) != total:  # a new submodule must be added to the breakdown
        raise AssertionError(f"parameter breakdown {counts} does not sum to the total {total}")
    return {"params_total": total, **counts}


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def cli_info(args) -> int:
    """`python -m jetformer info [--preset NAME ...] [--set k=v ...] [--json]`."""
    cfg = load_config(args.params, overlays=args.preset, overrides=args.set)
    m = cfg.model
    info = {
        "presets": list(args.preset),
        **parameter_counts(cfg),
        "image_tokens": cfg.num_image_tokens,
        "token_dim": cfg.token_dim,
        "factored_dims": m.factored_dims,
        "factoring": m.factoring,
        "conditioning": m.conditioning,
        "flow": f"{m.flow.num_couplings} couplings x {m.flow.depth} ViT blocks, width "
                f"{m.flow.width}",
        "decoder": f"width {m.decoder.width}, depth {m.decoder.depth}, heads "
                   f"{m.decoder.num_heads}x{m.decoder.head_dim}, mlp {m.decoder.mlp_dim}",
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        shown = f"{_human(value):>8}  ({value:,})" if key.startswith("params_") else value
        print(f"{key:20s} {shown}")
    return 0
