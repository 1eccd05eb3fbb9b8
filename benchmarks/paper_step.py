"""One real training step of a paper-size JetFormer on the CPU: forward, backward, AdamW.

    python benchmarks/paper_step.py [--preset jetformer_b --preset coco_ti] [--set k=v ...]
                                    [--batch 1] [--threads 2] [--force] [--out PATH]

Default: JetFormer-B (paper Table 1) at 256 px, patch 16 (256 tokens of 768 dims), d = 128,
K = 1024, in the multimodal text & image (T&I) layout, batch 1, one text-first row (the image
is scored, so the flow is trained), fp32. Weights, gradients and two Adam moments are 16 bytes
per parameter (~1.03B parameters: ~16.5 GB), so the step is made lean:
- activation checkpointing of every decoder block and every flow ViT block
  (`torch.utils.checkpoint`, recomputed in the backward pass);
- the optimizer step runs inside the backward pass, per parameter (a post-accumulate-grad
  hook steps that parameter's own AdamW and frees its gradient), so the gradients never exist
  all at once: 12 bytes per parameter. The global-norm clip needs every gradient at once and is
  left out of this step (the maths of each parameter's AdamW update is unchanged).
Refuses to start (exit 2) unless MemAvailable covers the estimate (parameters x 12 bytes + 4 GiB
of activations and workspace; --force skips the check). Writes the peak resident memory, the
FLOPs of forward + backward (counted by `torch.utils.flop_counter`, recomputation included),
and the times of building and of the step to benchmarks/results/paper_step.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config  # noqa: E402
from jetformer.models.jetformer import JetFormer  # noqa: E402
from jetformer.models.summary import parameter_counts  # noqa: E402
from jetformer.safe_io import atomic_write_json  # noqa: E402

GIB = 2 ** 30


class Checkpointed(nn.Module):
    """`inner(*args)` with its activations recomputed in the backward pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)


def checkpoint_blocks(model: JetFormer) -> int:
    """Wrap every decoder block and flow ViT block; returns how many were wrapped."""
    n = 0
    blocks = model.decoder.blocks
    for i in range(len(blocks)):
        blocks[i] = Checkpointed(blocks[i])
        n += 1
    flow = model.codec.flow
    for coupling in ([] if flow is None else flow.couplings):
        vit = coupling.net.blocks
        for i in range(len(vit)):
            vit[i] = Checkpointed(vit[i])
            n += 1
    return n


def optimizer_in_backward(model: nn.Module, train_cfg) -> dict:
    """One AdamW per parameter, stepped by a post-accumulate-grad hook that then frees the
    gradient (lr, betas, decoupled decay as `build_optimizer`, one group per parameter)."""
    from jetformer.train.optim import build_optimizer
    full = build_optimizer(model, train_cfg)          # the groups' hyper-parameters
    optimizers = {}
    for group in full.param_groups:
        hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
        for p in group["params"]:
            optimizers[p] = torch.optim.AdamW([p], **hyper)

    def hook(p):
        optimizers[p].step()
        p.grad = None
    for p in optimizers:
        p.register_post_accumulate_grad_hook(hook)
    return optimizers


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def text_first_batch(model: JetFormer, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    R, T = model.codec.resolution, model.max_text_len
    out = {"images": torch.randint(0, 256, (batch, R, R, 3), generator=g, dtype=torch.uint8),
           "image_first": torch.zeros(batch, dtype=torch.bool)}
    if model.conditioning == "class":
        out["labels"] = torch.randint(0, model.num_classes, (batch,), generator=g)
    else:
        out["text"] = torch.randint(4, model.vocab_size, (batch, T), generator=g)
        out["text_mask"] = torch.ones(batch, T, dtype=torch.bool)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", action="append", default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "paper_step.json"))
    args = p.parse_args(argv)
    presets = args.preset or ["jetformer_b", "coco_ti"]
    torch.set_num_threads(args.threads)
    cfg = load_config(REPO / "params.yaml", overlays=presets, overrides=args.set)

    counts = parameter_counts(cfg)
    n_params = counts["params_total"]
    need = n_params * 12 / GIB + 4.0
    avail = mem_available_gib()
    print(f"paper_step: {n_params / 1e9:.3f}B parameters; estimate {need:.1f} GiB, "
          f"MemAvailable {avail:.1f} GiB", flush=True)
    if need > avail and not args.force:
        print(f"paper_step: not run: needs about {need:.1f} GiB (12 bytes per parameter + 4 GiB), "
              f"{avail:.1f} GiB available (--force to try anyway)", file=sys.stderr)
        return 2

    t = time.perf_counter()
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=cfg.tokenizer.vocab_size,
                      num_classes=cfg.model.num_classes or 1000).train()
    wrapped = checkpoint_blocks(model)
    optimizers = optimizer_in_backward(model, cfg.train)
    build_s = time.perf_counter() - t
    rss_built = peak_rss_gib()
    batch = text_first_batch(model, args.batch)

    from torch.utils.flop_counter import FlopCounterMode
    before = [float(q.detach().double().abs().sum()) for q in optimizers]       # checksums
    t = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        out = model.compute_loss(batch, float(cfg.train.noise.sigma0),
                                 generator=torch.Generator().manual_seed(0))
        forward_s = time.perf_counter() - t
        out["loss"].backward()                       # AdamW runs inside, parameter by parameter
    step_s = time.perf_counter() - t
    moved = sum(b != float(q.detach().double().abs().sum()) for b, q in zip(before, optimizers))
    names = {q: n for n, q in model.named_parameters()}
    unused = [names[q] for q, o in optimizers.items() if not o.state]   # no gradient this step
    stepped = len(optimizers) - len(unused)
    report = {
        "benchmark": "paper_step", "presets": presets, "overrides": args.set,
        "batch": args.batch, "threads": args.threads, "dtype": "float32",
        "resolution": cfg.data.resolution, "patch_size": cfg.model.patch_size,
        "image_tokens": cfg.num_image_tokens, "factored_dims": cfg.model.factored_dims,
        "num_mixtures": cfg.model.num_mixtures, "params": n_params,
        "checkpointed_blocks": wrapped, "optimizer": "AdamW per parameter inside backward",
        "param_counts": counts, "params_stepped": stepped, "params_changed": moved,
        "params_tensors": len(optimizers),
        "params_without_gradient": unused,
        "loss": float(out["loss"].detach()), "image_bpd": float(out["image_bpd"]),
        "train_flops_fwd_bwd": counter.get_total_flops(),
        "build_s": round(build_s, 1), "forward_s": round(forward_s, 1),
        "step_s": round(step_s, 1),
        "peak_rss_gib_after_build": round(rss_built, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
        "mem_available_gib_before": round(avail, 1), "torch": torch.__version__,
    }
    out_path = Path(args.out)
    atomic_write_json(out_path, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
