"""`python -m jetformer nll --map OUT.png | manipulate | complete` (arguments in jetformer/cli.py).

Checkpoints and images load as in `jetformer.eval.commands` (a missing file raises
FileNotFoundError, bad input ValueError, both naming it; the CLI prints `error: ...`, exit 2).
"""
from __future__ import annotations

import torch


def _condition(model, cfg, tokenizer, prompt: str | None, label: int | None, n: int) -> dict:
    """Keyword arguments conditioning n rows on --prompt or --label ({} for neither)."""
    if prompt is not None:
        if model.conditioning != "text":
            raise ValueError("--prompt needs a text-conditional checkpoint (use --label)")
        text, mask = tokenizer.encode_batch([prompt] * n, cfg.tokenizer.max_text_len)
        return {"text": text, "text_mask": mask}
    if label is not None:
        if model.conditioning != "class":
            raise ValueError("--label needs a class-conditional checkpoint (use --prompt)")
        if not 0 <= label < model.num_classes:
            raise ValueError(f"--label {label} out of range [0, {model.num_classes})")
        return {"labels": torch.full((n,), label, dtype=torch.long)}
    return {}


def cli_nll(args) -> int:
    """`nll`, plus with `--map OUT.png` the per-patch split of every image's bits."""
    from jetformer.eval.commands import cli_nll as plain_nll
    from jetformer.eval.commands import load_for_cli, load_images
    from jetformer.eval.nll import png_bits_per_dim

    from .likelihood import patch_nll
    from .plots import likelihood_figure

    if not getattr(args, "map", None):
        return plain_nll(args)
    model, cfg, _ = load_for_cli(args.checkpoint, need_text=False)
    images = load_images(args.images, cfg.data.resolution)
    # the dequantisation stream of `heldout_bits_per_dim` (seed 0, eval.batch_size batches)
    g = torch.Generator(device=model.device).manual_seed(0)
    bs = cfg.eval.batch_size
    parts = [patch_nll(model, images[i:i + bs], g) for i in range(0, len(images), bs)]
    pnll = parts[0] if len(parts) == 1 else _concat(parts)
    png = png_bits_per_dim(images)
    r = cfg.data.resolution
    for i, path in enumerate(args.images):
        split = ", ".join(f"{k} {float(pnll.maps(k)[i].mean()):.4f}" for k in ("gmm", "factored",
                                                                               "logdet"))
        print(f"{path}\t{float(pnll.bits_per_dim[i]):.4f} bits/dim\t(PNG of the same {r}x{r} "
              f"image: {float(png[i]):.4f})\t= {split}")
    likelihood_figure(images, pnll, args.map, names=[p.split("/")[-1] for p in args.images])
    print(f"wrote {args.map}: bits/dim per patch (total, gmm, factored, logdet)")
    return 0


def _concat(parts):
    from dataclasses import replace
    cat = {k: torch.cat([getattr(p, k) for p in parts]) for k in
           ("gmm", "factored", "logdet", "total_bits", "bits_per_dim")}
    return replace(parts[0], **cat)


def cli_manipulate(args) -> int:
    from jetformer.eval.commands import load_for_cli, load_images

    from .manipulate import manipulations
    from .plots import cells_figure

    model, cfg, _ = load_for_cli(args.checkpoint, need_text=False)
    images = load_images(args.images, cfg.data.resolution)
    rows = [manipulations(model, img, seed=args.seed, noise_scales=tuple(args.noise))
            for img in images]
    cells_figure(rows, args.out, title="latent manipulations (paper App. D)")
    print(f"wrote {args.out}: {len(rows)} image(s) x " + "; ".join(lab for lab, _ in rows[0]))
    return 0


def cli_complete(args) -> int:
    from jetformer.eval.commands import load_for_cli, load_images

    from .complete import complete
    from .plots import cells_figure, completion_cells

    model, cfg, tokenizer = load_for_cli(args.checkpoint, need_text=False)
    images = load_images(args.images, cfg.data.resolution)
    cond = _condition(model, cfg, tokenizer, args.prompt, args.label, len(images))
    cfg_scale = args.cfg if args.cfg is not None else (cfg.eval.cfg_scale if cond else 0.0)
    temperature = cfg.eval.temperature if args.temperature is None else args.temperature
    out = complete(model, images, args.keep_rows, num_samples=args.num, cfg_scale=cfg_scale,
                   temperature=temperature, seed=args.seed, **cond)
    what = args.prompt or (f"label {args.label}" if args.label is not None else "[NOLABEL]")
    cells_figure(completion_cells(images, out), args.out,
                 title=f"completion from {args.keep_rows} patch rows ({what}, cfg {cfg_scale:g})")
    d = out.drift_summary()
    print(f"wrote {args.out}: {len(images)} image(s) x {args.num} completions from "
          f"{args.keep_rows} patch rows ({out.kept_tokens} of {model.num_image_tokens} tokens)")
    print(f"kept rows drift (decoded vs input, {out.kept_pixel_rows} px rows): mean "
          f"{d['kept_rows_mean_abs_px']:.3f} px, max {d['kept_rows_max_abs_px']:.1f} px, "
          f"{100 * d['kept_rows_changed_frac']:.1f}% of values changed")
    return 0
