"""Training-batch loader throughput at 256 px against what a training step consumes.

    python benchmarks/loader.py [--images 512] [--resolution 256] [--batch 32]
                                [--workers 0,1,2] [--batches 24] [--step-json PATH]

Prepares a synthetic split of `--images` images at `--resolution` (a temporary directory, the
real `prepare` stage), then times `BatchLoader` (the training loop's loader: memory-mapped Arrow
reads, flips, captions tokenised, batches built in worker processes with prefetch) for each
worker count: images/s over `--batches` batches after the first (start-up excluded). The
consumer side: images/s of one training step taken from a `benchmarks/paper_step.py` or
`benchmarks/gpu_step.py` report (`--step-json`, when given): the loader keeps up when its
images/s exceeds the step's. Writes benchmarks/results/loader.json (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config  # noqa: E402
from jetformer.data.dataset import ArrowImageDataset  # noqa: E402
from jetformer.data.loader import BatchLoader  # noqa: E402
from jetformer.data.prepare import prepare  # noqa: E402
from jetformer.safe_io import atomic_write_json  # noqa: E402


def step_images_per_s(path: Path) -> tuple[float, str] | None:
    r = json.loads(path.read_text())
    if "step_s" in r:                                   # paper_step.py
        return r["batch"] / r["step_s"], f"{path.name}: batch {r['batch']} in {r['step_s']} s"
    if "step_s_bf16" in r:                              # gpu_step.py
        return (r["batch"] / r["step_s_bf16"],
                f"{path.name}: batch {r['batch']} in {r['step_s_bf16']} s (bf16)")
    raise SystemExit(f"--step-json {path}: neither a paper_step nor a gpu_step report")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--step-json", type=Path, default=None)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="jetformer-loader-") as tmp:
        cfg = load_config(REPO / "params.yaml", overrides=[
            f"data.synthetic.out_dir={tmp}/raw", f"data.prepared_dir={tmp}/prepared",
            f"data.synthetic.num_train={args.images}", "data.synthetic.num_val=8",
            "data.synthetic.bad_files=false", f"data.resolution={args.resolution}",
            f"data.synthetic.min_side={args.resolution}",
            f"data.synthetic.max_side={args.resolution + 32}", "data.workers=2",
            "data.flip=true"])
        t = time.perf_counter()
        prepare(cfg)
        prepare_s = time.perf_counter() - t
        from jetformer.data.tokenizer import train_tokenizer, training_texts
        tok_path = Path(tmp) / "tok.model"
        tokenizer = train_tokenizer(training_texts(cfg.data.prepared_dir), tok_path,
                                    cfg.tokenizer.vocab_size)
        ds = ArrowImageDataset(cfg.data.prepared_dir, "train", flip=True,
                               generator=torch.Generator())
        runs = []
        for w in (int(x) for x in args.workers.split(",")):
            loader = BatchLoader(ds, args.batch, seed=0, rank=0, conditioning="text",
                                 tokenizer=tokenizer, max_text_len=cfg.tokenizer.max_text_len,
                                 workers=w, prefetch=4, pin_memory=torch.cuda.is_available())
            next(loader)                                 # start-up (worker processes, maps)
            t = time.perf_counter()
            for _ in range(args.batches):
                batch, _ = next(loader)
            dt = time.perf_counter() - t
            loader.close()
            runs.append({"workers": w, "images_per_s": round(args.batches * args.batch / dt, 1),
                         "batch_shape": list(batch["images"].shape)})
            print(json.dumps(runs[-1]), flush=True)
    report = {"benchmark": "loader", "resolution": args.resolution, "images": args.images,
              "batch": args.batch, "batches": args.batches, "prepare_s": round(prepare_s, 1),
              "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
              "runs": runs}
    if args.step_json is not None:
        rate, source = step_images_per_s(args.step_json)
        report.update(step_images_per_s=round(rate, 3), step_source=source,
                      loader_over_step=round(max(r["images_per_s"] for r in runs) / rate, 1))
    out = Path(args.out)
    atomic_write_json(out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
