"""Training step on one device, fp32 and bf16 autocast, plus their loss parity on a fixed batch.

    python benchmarks/gpu_step.py [--device cuda] [--preset NAME] [--set key=value ...]
                                  [--batch 32] [--steps 20] [--out PATH]

Builds the model of `params.yaml` (+ presets/overrides) with random weights (the zero-initialised
output layers perturbed too, so the loss depends on every layer) and a fixed random
batch (no prepared data needed), then
- parity: `compute_loss` with train=False (no curriculum/latent noise, dropout off, fixed
  dequantisation noise) in fp32 and under bf16 autocast: the relative loss difference must stay
  below `--tolerance` (bf16 matmuls, fp32 flow affine maps, GMM and losses);
- speed: median time of a full step (forward + backward + clip + AdamW) over `--steps`, fp32
  and bf16 autocast, as the training loop runs it (`train.compile` when --compile).
Exits 1 when the parity check fails. Writes a JSON report (atomically).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config  # noqa: E402
from jetformer.models.jetformer import JetFormer  # noqa: E402
from jetformer.safe_io import atomic_write_json  # noqa: E402
from jetformer.train.optim import build_optimizer, clip_gradients  # noqa: E402


def fixed_batch(model: JetFormer, batch: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    R = model.codec.resolution
    out = {"images": torch.randint(0, 256, (batch, R, R, 3), generator=g, dtype=torch.uint8)}
    if model.conditioning == "class":
        out["labels"] = torch.randint(0, model.num_classes, (batch,), generator=g)
    else:
        T = model.max_text_len
        out["text"] = torch.randint(4, model.vocab_size, (batch, T), generator=g)
        out["text_mask"] = torch.arange(T)[None] < torch.randint(2, T + 1, (batch, 1), generator=g)
        out["image_first"] = torch.arange(batch) % 2 == 1
    return {k: v.to(device) for k, v in out.items()}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=2e-2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_step.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(REPO / "params.yaml", overlays=args.preset, overrides=args.set)
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=cfg.tokenizer.vocab_size,
                      num_classes=cfg.model.num_classes or 10).to(device)
    batch = fixed_batch(model, args.batch, device)
    with torch.no_grad():  # move the zero-initialised heads/couplings off zero: a real check
        g = torch.Generator().manual_seed(0)
        for q in model.parameters():
            q.add_(0.02 * torch.randn(q.shape, generator=g).to(q))

    def autocast(bf16: bool):
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    losses = {}
    model.eval()
    with torch.no_grad():
        for bf16 in (False, True):
            with autocast(bf16):
                out = model.compute_loss(batch, 0.0, train=False,
                                         generator=torch.Generator(device).manual_seed(0))
            losses["bf16" if bf16 else "fp32"] = float(out["loss"])
    rel = abs(losses["bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-12)

    model.train()
    opt = build_optimizer(model, cfg.train)
    loss_fn = torch.compile(model.compute_loss) if args.compile else model.compute_loss
    gen = torch.Generator(device).manual_seed(1)
    times = {}
    for bf16 in (False, True):
        ts = []
        for i in range(args.steps + 3):                     # 3 warm-up steps
            sync(device)
            t = time.perf_counter()
            with autocast(bf16):
                loss = loss_fn(batch, 16.0, generator=gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sync(device)
            if i >= 3:
                ts.append(time.perf_counter() - t)
        times["bf16" if bf16 else "fp32"] = statistics.median(ts)
    report = {"benchmark": "gpu_step", "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "preset": args.preset, "overrides": args.set,
              "batch": args.batch, "steps": args.steps, "compile": args.compile,
              "params": sum(q.numel() for q in model.parameters()),
              "loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"],
              "loss_rel_diff": rel, "tolerance": args.tolerance, "parity_ok": rel < args.tolerance,
              "step_s_fp32": round(times["fp32"], 5), "step_s_bf16": round(times["bf16"], 5),
              "examples_per_s_bf16": round(args.batch / times["bf16"], 1),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
              if device.type == "cuda" else None, "torch": torch.__version__}
    out = Path(args.out)
    atomic_write_json(out, report)
    print(json.dumps(report, indent=2))
    if not report["parity_ok"]:
        print(f"gpu_step: bf16 loss {losses['bf16']} vs fp32 {losses['fp32']}: relative "
              f"difference {rel:.3g} >= {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
