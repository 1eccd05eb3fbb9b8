"""Sampling speed: one image with and without the KV cache, and flow encode/decode throughput.

    python benchmarks/sampling.py [--preset NAME] [--set key=value ...] [--checkpoint DIR]
                                  [--threads 1] [--repeats 3] [--flow-batch 64]

Without the cache every step recomputes the whole sequence (prefix + tokens so far), O(L^2)
token passes for an image of N tokens; with it, one prefill and N - 1 single-token steps.
Target (issue 7): the cache is >= 10x faster for a full image at the default preset. Reported
twice: the latency of one image (`kv_cache_speedup_batch1`) and the time per image when sampling
a batch of `eval.batch_size` images as the pipeline does (`kv_cache_speedup`).

At batch 1 on a CPU both paths are bound by per-op overhead, not FLOPs: one cached token is
~200 small ops (decoder step, GMM head, GIVT CFG rejection sampler) at ~1.5-3 us each plus the
decoder's weights streamed once (3 MB at the default), while a recomputed step at these sequence
lengths (26..89 tokens, 2 rows) costs only ~6x a cached one. Both paths also pay the same flow
inverse (`flow_decode_one_image_s`); `kv_cache_speedup_batch1_tokens` leaves it out.
Sampling uses the CFG batch (conditional + [NOLABEL] stream) at `eval.cfg_scale`. Weights are
random unless --checkpoint is given (timing depends on sizes, not on what was learned).
Times are the best of `--repeats` runs, cached and recomputed runs interleaved (a shared machine's
load hits both alike), measured as this process's CPU time on a 1-thread CPU run (robust to
other processes taking the core), wall time otherwise.
Writes benchmarks/results/sampling.json (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config  # noqa: E402
from jetformer.models.jetformer import EOS_ID, JetFormer  # noqa: E402
from jetformer.noise import to_model_space  # noqa: E402
from jetformer.safe_io import atomic_write_json  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock_for(device, threads: int):
    """CPU time of this process for a 1-thread CPU run (other processes on a shared machine do
    not count), wall time otherwise (CUDA, several threads)."""
    if device.type == "cpu" and threads == 1:
        return time.process_time, "process_time"
    return time.perf_counter, "perf_counter"


def best_times(fns: dict, device, repeats: dict, clock=time.perf_counter,
               warmup: bool = True) -> dict:
    """Best time of each fn over its number of repeats, the fns' runs interleaved."""
    if warmup:
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for i in range(max(repeats.values())):
        for name, fn in fns.items():
            if i < repeats[name]:
                _sync(device)
                t = clock()
                fn()
                _sync(device)
                best[name] = min(best[name], clock() - t)
    return best


def best_time(fn, device, repeats: int, warmup: bool = True, clock=time.perf_counter) -> float:
    return best_times({"fn": fn}, device, {"fn": repeats}, clock, warmup)["fn"]


def build(args, device):
    if args.checkpoint:
        from jetformer.train.checkpoint import load_trained
        model, cfg = load_trained(args.checkpoint, device=device)
        return model, cfg
    cfg = load_config(REPO / "params.yaml", overlays=args.preset, overrides=args.set)
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=cfg.tokenizer.vocab_size,
                      num_classes=cfg.model.num_classes or 10)
    return model.to(device).eval(), cfg


def condition(model, cfg, device, batch: int):
    """Example prompts: class labels, or captions of 3..10 tokens padded to max_text_len."""
    if cfg.model.conditioning == "class":
        return {"labels": torch.arange(batch, device=device) % model.num_classes}
    T = cfg.tokenizer.max_text_len
    text = torch.zeros(batch, T, dtype=torch.long, device=device)
    for i in range(batch):
        n = min(3 + i % 8, T)
        text[i, :n - 1] = (torch.arange(n - 1) + i) % (model.vocab_size - 4) + 4
        text[i, n - 1] = EOS_ID
    return {"text": text, "text_mask": text != 0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--checkpoint", default="")
    # 1 thread = one Ray training/eval worker; on a shared 2-core box 2 threads oversubscribe
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=0, help="images per sampling batch for the "
                   "throughput numbers (default eval.batch_size)")
    p.add_argument("--flow-batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampling.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    model, cfg = build(args, device)
    clock, clock_name = clock_for(device, args.threads)
    cfg_scale, temperature = cfg.eval.cfg_scale, cfg.eval.temperature
    batch = args.batch or cfg.eval.batch_size

    def sample(use_cache, n):
        cond = condition(model, cfg, device, n)

        def run():
            model.sample_images(**cond, cfg_scale=cfg_scale, temperature=temperature,
                                generator=torch.Generator(device).manual_seed(0),
                                use_cache=use_cache)
        return run

    with torch.no_grad():
        R, B = cfg.data.resolution, args.flow_batch
        images = torch.randint(0, 256, (B, R, R, 3), dtype=torch.uint8, device=device)
        x = to_model_space(images)
        tokens, rest, _ = model.codec.encode(x)
        one = best_times({"cache": sample(True, 1), "nocache": sample(False, 1),
                          "decode": lambda: model.codec.decode(tokens[:1],
                                                               generator=torch.Generator(device))},
                         device, {"cache": args.repeats, "nocache": max(1, args.repeats - 2),
                                  "decode": args.repeats}, clock)
        t_cache, t_nocache, t_decode1 = one["cache"], one["nocache"], one["decode"]
        tb_cache = best_time(sample(True, batch), device, args.repeats, clock=clock) / batch
        tb_nocache = best_time(sample(False, batch), device, 1, warmup=False, clock=clock) / batch
        t_encode = best_time(lambda: model.codec.encode(x), device, args.repeats, clock=clock)
        t_decode = best_time(lambda: model.codec.decode(tokens, rest), device, args.repeats,
                             clock=clock)

    result = {
        "preset": args.preset or ["<params.yaml default>"],
        "overrides": args.set,
        "checkpoint": args.checkpoint or None,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "threads": args.threads,
        "clock": clock_name,
        "load_avg_1min": round(os.getloadavg()[0], 2),    # other processes on the machine
        "repeats": args.repeats,
        "params_total": sum(q.numel() for q in model.parameters()),
        "image_tokens": cfg.num_image_tokens,
        "cfg_scale": cfg_scale,
        "temperature": temperature,
        # latency of a single image (batch of 1; the CFG batch holds 2 rows)
        "sample_one_image_s_kv_cache": round(t_cache, 4),
        "sample_one_image_s_no_cache": round(t_nocache, 4),
        "kv_cache_speedup_batch1": round(t_nocache / t_cache, 2),
        # the flow inverse of that one image (in both times above), and the speedup without it
        "flow_decode_one_image_s": round(t_decode1, 4),
        "kv_cache_speedup_batch1_tokens": round((t_nocache - t_decode1)
                                                / max(t_cache - t_decode1, 1e-9), 2),
        # time per image when sampling `batch` images at once (the sample/eval stages)
        "batch": batch,
        "sample_per_image_s_kv_cache": round(tb_cache, 4),
        "sample_per_image_s_no_cache": round(tb_nocache, 4),
        "kv_cache_speedup": round(tb_nocache / tb_cache, 2),
        "flow_batch": B,
        "flow_encode_images_per_s": round(B / t_encode, 1),
        "flow_decode_images_per_s": round(B / t_decode, 1),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
