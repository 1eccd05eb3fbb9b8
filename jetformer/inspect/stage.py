"""DVC stage `inspect`: for the first few val images, a likelihood map, a latent-manipulation
grid and a completion grid (plots/inspect/*.png), and the text -> image -> text round trip of
the `sample` stage's text-to-image samples, captioned by the captioning fine-tune
(metrics/inspect.json, plots/inspect/roundtrip.png, plots/inspect_roundtrip.csv); all logged
to the training's MLflow run (best effort: the files are written either way)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from jetformer.safe_io import safe_load

NUM_IMAGES = 4            # val images per grid
NUM_COMPLETIONS = 3       # completions per image (from the top half of the patch rows)
NUM_ROUNDTRIP_SHOWN = 8   # samples shown in the round-trip grid


def _conditions(model, mcfg, tokenizer, items) -> dict:
    """Each val item's own condition: its first caption (text models) or its label."""
    if model.conditioning == "class":
        return {"labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}
    if not all(it["captions"] for it in items):
        return {}
    text, mask = tokenizer.encode_batch([it["captions"][0] for it in items],
                                        mcfg.tokenizer.max_text_len)
    return {"text": text, "text_mask": mask}


def _roundtrip(cfg, samples: Path, captioner: Path, plots: Path, table: Path) -> dict:
    """Round-trip metrics of `samples/t2i.pt` captioned by `captioner` (None with the reason
    when there is nothing to caption or no captioner)."""
    from jetformer.eval.attributes import t2i_asked
    from jetformer.eval.finetune import generate_captions
    from jetformer.eval.report import read_json, write_csv
    from jetformer.eval.stages import _load_finetuned

    from .plots import cells_figure
    from .roundtrip import roundtrip_scores

    null = {"roundtrip_cider": None, "roundtrip_attribute_recall": None}
    Path(table).unlink(missing_ok=True)
    info = read_json(captioner / "finetune.json")
    def skipped(reason: str) -> dict:
        return {**null, **{f"{k}_unavailable": reason for k in null}, "roundtrip_skipped": reason}

    if info.get("skipped"):
        return skipped(f"no captioner: {info['skipped']}")
    if not (samples / "t2i.pt").is_file():
        return skipped(f"no text-to-image samples in {samples}")
    s = safe_load(samples / "t2i.pt", "samples")
    net, _, tokenizer = _load_finetuned(captioner, cfg)
    captions = generate_captions(net, tokenizer, s["images"], max_len=cfg.eval.max_decode_len,
                                 batch_size=cfg.eval.batch_size)
    metrics, rows = roundtrip_scores(s["prompts"], captions,
                                     [t2i_asked(a) for a in s["attributes"]])
    write_csv(table, rows)
    k = NUM_ROUNDTRIP_SHOWN
    cells = [[(f"{p[:28]}\n-> {c[:28]}", img) for p, c, img in
              zip(s["prompts"][i:i + 4], captions[i:i + 4], s["images"][i:i + 4])]
             for i in range(0, min(k, len(captions)), 4)]
    cells_figure(cells, plots / "roundtrip.png", title="prompt -> sample -> caption")
    if metrics["roundtrip_attribute_recall"] is None:
        metrics["roundtrip_attribute_recall_unavailable"] = (
            "the prompts' source has no scene attributes to recall")
    return metrics


def run_inspect(cfg, plots: str | Path = "plots/inspect",
                metrics: str | Path = "metrics/inspect.json",
                samples: str | Path = "data/eval/samples",
                captioner: str | Path = "models/finetune_caption",
                table: str | Path = "plots/inspect_roundtrip.csv") -> dict:
    """Write the inspection grids and metrics; returns the metrics dict."""
    from jetformer.data.dataset import ArrowImageDataset
    from jetformer.stage import write_metrics
    from jetformer.eval.stages import text_tokenizer
    from jetformer.train.checkpoint import load_trained

    from .complete import complete
    from .likelihood import patch_nll
    from .manipulate import manipulations
    from .plots import cells_figure, completion_cells, likelihood_figure

    model, mcfg = load_trained(cfg.train.out_dir)
    val = ArrowImageDataset(cfg.data.prepared_dir, "val")
    if len(val) == 0:
        raise ValueError(f"{cfg.data.prepared_dir}/val has no images to inspect")
    tokenizer = text_tokenizer(mcfg, cfg) if model.conditioning == "text" else None
    plots = Path(plots)
    shutil.rmtree(plots, ignore_errors=True)        # no grid of an earlier model survives
    plots.mkdir(parents=True)
    t0 = time.time()
    items = [val[i] for i in range(min(NUM_IMAGES, len(val)))]
    images = torch.stack([it["image"] for it in items])
    names = [str(it["id"]) for it in items]

    pnll = patch_nll(model, images, torch.Generator(device=model.device).manual_seed(cfg.seed))
    likelihood_figure(images, pnll, plots / "likelihood.png", names=names)
    rows = [manipulations(model, img, seed=cfg.seed) for img in images]
    cells_figure(rows, plots / "manipulations.png", title="latent manipulations (paper App. D)")
    cond = _conditions(model, mcfg, tokenizer, items)
    keep = (mcfg.data.resolution // mcfg.model.patch_size) // 2
    comp = complete(model, images, keep, num_samples=NUM_COMPLETIONS,
                    cfg_scale=cfg.eval.cfg_scale if cond else 0.0,
                    temperature=cfg.eval.temperature, seed=cfg.seed, **cond)
    cells_figure(completion_cells(images, comp), plots / "completion.png",
                 title=f"completion from the first {keep} patch rows")

    result = {"inspect_num_images": len(images),
              **{f"inspect_{k}_bits_per_dim": float(pnll.maps(k).mean())
                 for k in ("total", "gmm", "factored", "logdet")},
              "inspect_flow_roundtrip_exact": all(torch.equal(r[0][1], img)
                                                  for r, img in zip(rows, images)),
              "completion_keep_rows": keep,
              **{f"completion_{k}": v for k, v in comp.drift_summary().items()}}
    result.update(_roundtrip(cfg, Path(samples), Path(captioner), plots, Path(table)))
    result["inspect_seconds"] = time.time() - t0
    write_metrics(metrics, result)   # logged to MLflow by eval_report's evaluation run
    for k, v in result.items():
        print(f"  {k:40s} {v:.4f}" if isinstance(v, float) else f"  {k:40s} {v}")
    return result
