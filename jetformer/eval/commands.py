"""`python -m jetformer sample | caption | answer | nll` (argument parsing in jetformer/cli.py).

Every command loads the exported checkpoint (`load_trained`), its tokenizer, and reads images
exactly as `prepare` does (RGB, shorter side resized, central crop). A missing path raises
FileNotFoundError and an unreadable image ValueError, both naming the file (the CLI prints
them as one line `error: ...` and exits with status 1).
"""
from __future__ import annotations

from pathlib import Path

import torch



def load_images(paths: list[str], resolution: int, min_side: int = 1) -> torch.Tensor:
    """uint8 [N, R, R, 3] of image files, preprocessed like the prepared data."""
    from jetformer.data.readers import BadFile, load_image

    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"image not found: {p}")
        if not path.is_file():
            raise ValueError(f"not an image file: {p}")
        try:
            pixels, _ = load_image(path, resolution, min_side)
        except BadFile as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
        out.append(torch.from_numpy(pixels))
    return torch.stack(out)


def load_for_cli(checkpoint: str, need_text: bool = True):
    """(model, cfg, tokenizer or None) for a command."""
    from jetformer.data.tokenizer import TextTokenizer, tokenizer_path
    from jetformer.train.checkpoint import load_trained

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model, cfg = load_trained(checkpoint)
    tokenizer = None
    if cfg.model.conditioning == "text":
        tokenizer = TextTokenizer(tokenizer_path(cfg, checkpoint))
    elif need_text:
        raise ValueError(f"checkpoint {checkpoint} is a class-conditional model: it has no text "
                         "(captioning/VQA need model.conditioning='text')")
    return model, cfg, tokenizer


def sample_grid(model, cfg, tokenizer, *, prompts=(), labels=(), num: int = 8, cfg_scale=None,
                temperature=None, seed: int = 0) -> torch.Tensor:
    """uint8 [len(prompts or labels) * num, H, W, 3]: `num` samples per prompt (or label), in
    order."""
    from jetformer.eval.sampling import sample_from_labels, sample_from_text

    cfg_scale = cfg.eval.cfg_scale if cfg_scale is None else float(cfg_scale)
    temperature = cfg.eval.temperature if temperature is None else float(temperature)
    if cfg_scale < 0 or temperature <= 0:
        raise ValueError(f"--cfg must be >= 0 and --temperature > 0, got {cfg_scale}, "
                         f"{temperature}")
    if num <= 0:
        raise ValueError(f"--num must be > 0, got {num}")
    if labels:
        if model.conditioning != "class":
            raise ValueError("--label needs a class-conditional checkpoint; this one is "
                             "text-conditional "
                             "(use --prompt)")
        bad = [y for y in labels if not 0 <= y < model.num_classes]
        if bad:
            raise ValueError(f"--label {bad[0]} out of range [0, {model.num_classes})")
        return sample_from_labels(model, [y for y in labels for _ in range(num)],
                                  cfg_scale=cfg_scale, temperature=temperature,
                                  batch_size=cfg.eval.batch_size, seed=seed)
    if not prompts:
        raise ValueError("give --prompt TEXT (text-conditional model) or --label N "
                         "(class-conditional)")
    if model.conditioning != "text":
        raise ValueError("--prompt needs a text-conditional checkpoint; this one is "
                         "class-conditional "
                         "(use --label)")
    return sample_from_text(model, tokenizer, [p for p in prompts for _ in range(num)],
                            max_text_len=cfg.tokenizer.max_text_len, cfg_scale=cfg_scale,
                            temperature=temperature, batch_size=cfg.eval.batch_size, seed=seed)


def cli_sample(args) -> int:
    from jetformer.eval.sampling import make_grid, save_png

    model, cfg, tokenizer = load_for_cli(args.checkpoint, need_text=False)
    images = sample_grid(model, cfg, tokenizer, prompts=args.prompt, labels=args.label,
                         num=args.num,
                         cfg_scale=args.cfg, temperature=args.temperature, seed=args.seed)
    scale = max(1, 128 // images.shape[1])
    save_png(make_grid(images, nrow=args.num, scale=scale), args.out)
    rows = args.prompt or [f"label {y}" for y in args.label]
    print(f"wrote {args.out}: {len(rows)} row(s) x {args.num} samples ({', '.join(rows)})")
    return 0


def cli_caption(args) -> int:
    from jetformer.eval.finetune import generate_captions

    model, cfg, tokenizer = load_for_cli(args.checkpoint)
    images = load_images(args.images, cfg.data.resolution)
    captions = generate_captions(model, tokenizer, images, max_len=cfg.eval.max_decode_len,
                                 batch_size=cfg.eval.batch_size)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")
    return 0


def cli_answer(args) -> int:
    from jetformer.eval.finetune import generate_answers

    if not args.question.strip():
        raise ValueError("the question is empty")
    model, cfg, tokenizer = load_for_cli(args.checkpoint)
    images = load_images([args.image], cfg.data.resolution)
    answer = generate_answers(model, tokenizer, images, [args.question],
                              max_text_len=cfg.tokenizer.max_text_len,
                              max_len=cfg.eval.max_decode_len, batch_size=1)[0]
    print(answer)
    return 0


def cli_nll(args) -> int:
    from jetformer.eval.nll import heldout_bits_per_dim, png_bits_per_dim

    model, cfg, _ = load_for_cli(args.checkpoint, need_text=False)
    images = load_images(args.images, cfg.data.resolution)
    bpd = heldout_bits_per_dim(model, images, batch_size=cfg.eval.batch_size)
    png = png_bits_per_dim(images)
    r = cfg.data.resolution
    for path, b, p in zip(args.images, bpd.tolist(), png.tolist()):
        print(f"{path}\t{b:.4f} bits/dim\t(PNG of the same {r}x{r} image: {p:.4f})")
    return 0
