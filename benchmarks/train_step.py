"""Training throughput and model FLOP utilisation (MFU) for 1 and 2 data-parallel workers.

Runs the real `train_loop` (no Ray: its start-up is not part of a step) in 1 and 2 processes
joined by a gloo (CPU) or nccl (GPU) process group, on the prepared data of `params.yaml`.
MFU = (examples/s x training FLOPs per example) / (workers x matmul peak of one worker), the
peak measured in this same run with a dense fp32 (CPU) / bf16 (CUDA) matmul on the same
number of threads a worker uses, and the FLOPs per example counted by
`torch.utils.flop_counter` over one forward + backward of `compute_loss`.

    python benchmarks/train_step.py [--steps 30] [--workers 1,2] [--set key=value ...]
Writes benchmarks/results/train_step.json (needs `data/prepared` and the tokenizer: run
`dvc repro tokenizer` first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config  # noqa: E402
from jetformer.safe_io import atomic_write_json  # noqa: E402
from jetformer.train.checkpoint import build_model  # noqa: E402
from jetformer.train.launch import absolute_paths  # noqa: E402
from jetformer.train.loop import load_inputs, make_batch, train_loop  # noqa: E402
from jetformer.train.tracking import project_root  # noqa: E402


def matmul_peak_gflops(device: str, dtype: torch.dtype, size: int = 1024,
                       repeats: int = 10) -> float:
    """Best-of-3 dense matmul throughput (the denominator of MFU)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 * repeats / best / 1e9


def train_flops_per_example(cfg, device: str) -> float:
    """FLOPs of one forward + backward of `compute_loss` on a batch, per example."""
    from torch.utils.flop_counter import FlopCounterMode

    from jetformer.data.dataset import ArrowImageDataset
    inputs = load_inputs(cfg)
    model = build_model(cfg, inputs["vocab_size"], inputs["num_classes"], inputs["pca"]).to(device)
    ds = ArrowImageDataset(cfg.data.prepared_dir, "train")
    B = min(16, len(ds))
    batch = make_batch([ds[i] for i in range(B)], model.conditioning, inputs["tokenizer"],
                       cfg.tokenizer.max_text_len, torch.Generator().manual_seed(0))
    batch = {k: v.to(device) for k, v in batch.items()}
    if cfg.train.task == "both":   # the expected 50/50 mix of text-first and image-first rows
        batch["image_first"] = torch.arange(B, device=device) % 2 == 1
    with FlopCounterMode(display=False) as counter:
        model.compute_loss(batch, 8.0)["loss"].backward()
    return counter.get_total_flops() / B


def _worker(rank: int, world_size: int, port: int, cfg_dict: dict, threads: int, out_q) -> None:
    from jetformer.config import config_from_dict
    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1:
        import torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size)
    rows = []
    train_loop(cfg, rank=rank, world_size=world_size, reporter=lambda m, d: None,
               progress=lambda r: rows.append(r) if "examples_per_s" in r else None,
               device=device)
    if rank == 0:
        out_q.put(rows)
    if world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cfg, world_size: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    t = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, cfg.to_dict(), threads, q))
             for r in range(world_size)]
    for p in procs:
        p.start()
    rows = q.get(timeout=3600)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"benchmark worker exited with {p.exitcode}")
    steady = rows[1:] or rows            # the first log interval includes warm-up
    eps = sum(r["examples_per_s"] for r in steady) / len(steady)
    return {"workers": world_size, "threads_per_worker": threads, "examples_per_s": round(eps, 2),
            "seconds_per_step": round(cfg.train.batch_size / eps, 4),
            "wall_s": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    root = project_root()          # the project whose prepared data is used (run `dvc repro` first)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    worker_counts = [int(w) for w in args.workers.split(",")]
    if cuda:
        worker_counts = [w for w in worker_counts if w <= torch.cuda.device_count()]
    threads = 1 if not cuda else max(1, (os.cpu_count() or 1) // max(worker_counts))
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak_gflops(device, dtype)

    results = []
    for w in worker_counts:
        cfg = absolute_paths(load_config(root / "params.yaml", overrides=[
            f"train.steps={args.steps}", f"train.log_every={max(args.steps // 3, 1)}",
            f"train.checkpoint_every={args.steps}", "train.val_images=0", "train.sample_prompts=0",
            f"train.num_workers={w}", *args.set]), root)
        flops = train_flops_per_example(cfg, device)
        r = measure(cfg, w, threads)
        achieved = r["examples_per_s"] * flops / 1e9
        r.update(train_gflops_per_example=round(flops / 1e9, 4), achieved_gflops=round(achieved, 2),
                 mfu=round(achieved / (w * peak), 4), global_batch=cfg.train.batch_size)
        results.append(r)
        print(json.dumps(r), flush=True)

    report = {"benchmark": "train_step", "device": device,
              "device_name": (torch.cuda.get_device_name(0) if cuda
                              else platform.processor() or platform.machine()),
              "cpu_count": os.cpu_count(), "load_average_1m_after": round(os.getloadavg()[0], 2),
              "matmul_peak_gflops_per_worker": round(peak, 1),
              "matmul_dtype": str(dtype).replace("torch.", ""), "steps": args.steps,
              "overrides": args.set, "results": results,
              "note": "MFU = examples/s x FLOPs/example / (workers x per-worker matmul peak); "
                      "steps exclude Ray start-up, validation and sampling; a load average above "
                      "the core count means other jobs shared the CPUs"}
    out = root / args.out
    atomic_write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
