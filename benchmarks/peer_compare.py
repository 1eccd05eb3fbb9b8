"""This repo against a public PyTorch port (alexojica/JetFormer), side by side in one run.

    python benchmarks/peer_compare.py --peer /path/to/JetFormer-checkout [--threads 2]
                                      [--repeats 15] [--sizes tiny,small] [--samples 8]

Both models are built at the same sizes: 32 px, patch 4 (64 tokens of 48 dims, 16 modelled
by the decoder's GMM), class-conditional with 1 class token and 10 classes; flow of `couplings`
channel couplings x `flow_width`, 1 ViT block (4 heads, MLP 4x width); decoder `width` x `depth`
(4 heads, 1 KV head, MLP 4x width); K = 8 mixtures; batch 32.
- train step = forward + backward + global-norm clip + AdamW on one fixed batch (RGB noise and
  latent noise on, dropout 0.1 in the decoder), each contender with its own loss code;
- sampling = `--samples` class-conditional images with the KV cache, batched (one prefill for the
  batch, one token per step for every row), without and with CFG (scale 5), flow inverse
  included. The peer's own sampler loops over classes one image at a time; its batched run here
  is driven through its public pieces (`embed_sequence`, `prefill_cache`, `extend_cache`,
  `get_pdf`, `CFGDensity`, `decode_tokens_to_image01`), which is faster than its own loop.
The two contenders' repetitions are interleaved (A, B, A, B, ...), so load from other processes
on a shared machine hits both alike; times are medians of wall clock, or of this process's CPU
time with `--threads 1` (robust to other processes taking the cores). The peer's code is
imported from `--peer` (never copied); it imports `wandb` for logging only, so an empty module
stands in for it when wandb is not installed. Each row also says what bounds it (`op_profile`,
`floors`): ATen calls per run, the share of time in matrix products, and the ratio this repo
would reach if everything but its matrix products were free. Writes
benchmarks/results/peer_compare.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace as NS

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config
from jetformer.models.jetformer import JetFormer
from jetformer.safe_io import atomic_write_json  # noqa: E402
from jetformer.train.optim import build_optimizer, clip_gradients

SIZES = {  # couplings, flow width, decoder width, decoder depth (issue 13's tiny and small)
    "tiny": {"couplings": 8, "flow_width": 64, "width": 128, "depth": 4},
    "small": {"couplings": 12, "flow_width": 96, "width": 192, "depth": 6},
}
RES, PATCH, DIMS, K, CLASSES, BATCH = 32, 4, 16, 8, 10, 32
SIGMA_RGB, LATENT_NOISE, CFG_DROP, DROPOUT = 16.0, 0.3, 0.1, 0.1


def our_config(size: dict, compile_step: bool = False):
    s = size
    return load_config(REPO / "params.yaml", overrides=[
        f"data.resolution={RES}", f"model.patch_size={PATCH}", f"model.factored_dims={DIMS}",
        "model.factoring=post_flow", "model.conditioning=class", f"model.num_classes={CLASSES}",
        "model.num_class_tokens=1", f"model.num_mixtures={K}",
        f"model.latent_noise_max={LATENT_NOISE}", "train.task=class",
        f"train.cfg_drop_prob={CFG_DROP}",
        f"model.flow.num_couplings={s['couplings']}", f"model.flow.width={s['flow_width']}",
        "model.flow.depth=1", "model.flow.num_heads=4", f"model.flow.mlp_dim={4 * s['flow_width']}",
        f"model.decoder.width={s['width']}", f"model.decoder.depth={s['depth']}",
        "model.decoder.num_heads=4", f"model.decoder.head_dim={s['width'] // 4}",
        f"model.decoder.mlp_dim={4 * s['width']}", f"model.decoder.dropout={DROPOUT}"])


def peer_config(size: dict):
    s = size
    return NS(
        model=NS(width=s["width"], depth=s["depth"], mlp_dim=4 * s["width"], num_heads=4,
                 num_kv_heads=1, vocab_size=CLASSES + 3, bos_id=CLASSES, boi_id=CLASSES + 1,
                 nolabel_id=CLASSES + 2, num_mixtures=K, dropout=DROPOUT, head_dtype="fp32",
                 num_vocab_repeats=1, scale_tol=1e-6, causal_mask_on_prefix=True,
                 untie_output_vocab=False, per_modality_final_norm=False,
                 right_align_inputs=True, strict_special_ids=True, use_boi_token=True,
                 max_seq_len=1, rope_skip_pad=True, remat_policy="none"),
        input=NS(input_size=[RES, RES], num_classes=CLASSES, class_token_length=1),
        patch_pca=NS(model=NS(depth_to_seq=1, patch_size=PATCH, codeword_dim=DIMS, noise_std=0.0,
                              add_dequant_noise=True, skip_pca=True, whiten=True)),
        use_adaptor=True,
        adaptor=NS(kind="jet", latent_noise_dim=0,
                   model=NS(depth=s["couplings"], block_depth=1, emb_dim=s["flow_width"],
                            num_heads=4, actnorm=False, invertible_dense=False,
                            flow_grad_checkpoint=False, ps=1, kinds=["channels"],
                            channels_coupling_projs=["random"],
                            spatial_coupling_projs=["checkerboard", "checkerboard-inv"])))


def import_peer(path: Path):
    if not (path / "src" / "jetformer.py").is_file():
        raise SystemExit(f"--peer {path}: no src/jetformer.py there (a checkout of "
                         "github.com/alexojica/JetFormer is expected)")
    try:
        import wandb  # noqa: F401
    except ImportError:  # logging only (histograms); never called by the code measured here
        sys.modules["wandb"] = types.ModuleType("wandb")
    sys.path.insert(0, str(path))
    from src.jetformer import JetFormer as PeerJetFormer
    from src.utils import losses, sampling
    return PeerJetFormer, losses, sampling


def fixed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, RES, RES, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return images, labels


def our_step_fn(size: dict, images, labels, compile_step: bool):
    cfg = our_config(size)
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=cfg.tokenizer.vocab_size).train()
    opt = build_optimizer(model, cfg.train)
    batch = {"images": images, "labels": labels}
    g = torch.Generator().manual_seed(0)
    loss_fn = model.compute_loss
    if compile_step:
        loss_fn = torch.compile(model.compute_loss)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch, SIGMA_RGB, generator=g)["loss"]
        loss.backward()
        clip_gradients(model.parameters(), 1.0)
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def peer_step_fn(peer, size: dict, images, labels):
    PeerJetFormer, losses, _ = peer
    torch.manual_seed(0)
    model = PeerJetFormer.from_config(peer_config(size), torch.device("cpu")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    batch = {"image": images.permute(0, 3, 1, 2).contiguous(), "text": labels[:, None],
             "text_mask": torch.ones(BATCH, 1, dtype=torch.bool),
             "text_loss": torch.zeros(BATCH, 1, dtype=torch.bool)}

    def step():
        opt.zero_grad(set_to_none=True)
        out = losses.compute_jetformer_pca_loss(
            model, batch, 0, 1000, text_first_prob=1.0, input_noise_std=LATENT_NOISE,
            cfg_drop_prob=CFG_DROP, loss_on_prefix=False, noise_scale=SIGMA_RGB, noise_min=0.0)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def our_sample_fn(size: dict, n: int, cfg_scale: float):
    cfg = our_config(size)
    torch.manual_seed(0)
    model = JetFormer.from_config(cfg, vocab_size=cfg.tokenizer.vocab_size).eval()
    labels = torch.arange(n) % CLASSES

    def run():
        with torch.no_grad():
            model.sample_images(labels=labels, cfg_scale=cfg_scale, temperature=1.0,
                                generator=torch.Generator().manual_seed(0))
    return run


@torch.no_grad()
def peer_batched_sample(model, sampling, labels, cfg_scale: float):
    """Batched KV-cache sampling with the peer's own pieces (its sampler, batch > 1)."""
    B = labels.shape[0]
    text = labels[:, None]
    mask = torch.ones(B, 1, dtype=torch.bool)
    drop = torch.zeros(B, dtype=torch.bool)
    if cfg_scale > 0:
        text, mask = torch.cat([text, text]), torch.cat([mask, mask])
        drop = torch.cat([drop, torch.ones(B, dtype=torch.bool)])
    rows = text.shape[0]
    empty = torch.empty(rows, 0, model.image_ar_dim)
    x, attn, _, input_mask = model.embed_sequence(text, empty, torch.ones(rows, dtype=torch.bool),
                                                  mask, drop_text_cond_mask=drop, shift=False)
    cache_size = int(x.shape[1] + model.image_seq_len - 1)
    last, cache = model.prefill_cache(x, attn, input_mask, cache_size=cache_size)
    tokens = torch.zeros(B, model.image_seq_len, model.image_ar_dim)
    for pos in range(model.image_seq_len):
        logits = model.img_head(last)
        if cfg_scale > 0:
            pdf_c, pdf_u = model.get_pdf(logits[:B]), model.get_pdf(logits[B:])
            drawn = sampling.CFGDensity(pdf_c, pdf_u, w=cfg_scale).sample()        # [B, 1, d]
            fed = torch.cat([drawn, drawn])
        else:
            drawn = fed = model.get_pdf(logits).sample()
        tokens[:, pos] = drawn[:, 0]
        if pos == model.image_seq_len - 1:
            break
        last, cache = model.extend_cache(model.image_emb(fed), cache, None, cache_size=cache_size)
    rest = torch.randn(B, model.image_seq_len, model.image_token_dim - model.image_ar_dim)
    return model.decode_tokens_to_image01(torch.cat([tokens, rest], dim=-1))


def peer_sample_fn(peer, size: dict, n: int, cfg_scale: float):
    PeerJetFormer, _, sampling = peer
    torch.manual_seed(0)
    model = PeerJetFormer.from_config(peer_config(size), torch.device("cpu")).eval()
    labels = torch.arange(n) % CLASSES

    def run():
        torch.manual_seed(0)
        peer_batched_sample(model, sampling, labels, cfg_scale)
    return run


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2, clock=time.perf_counter) -> dict:
    """Median time of each fn by `clock`, the fns' repetitions interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::convolution_backward",
            "aten::_convolution", "aten::mkldnn_convolution"}


def op_profile(fn, repeats: int = 2) -> dict:
    """What bounds `fn` (torch.profiler, CPU): ATen calls per run and the share of self CPU
    time spent inside matrix products (mm, addmm, bmm, baddbmm, attention, convolution); the
    rest is per-op overhead and small elementwise ops. `matmul_floor_s` = time × that share:
    what `fn` would take if everything but its matrix products were free."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    return {"aten_calls": round(sum(e.count for e in events if e.key.startswith("aten::"))
                                / repeats),
            "matmul_share": round(matmul / total, 3)}


def floors(t: dict, profiles: dict) -> dict:
    """Per contender: its calls, matmul share and matmul floor; and the ratio this repo would
    reach at its own matmul floor against the peer as measured (the bound of eager speed-ups
    that keep the same matrix products)."""
    row = {}
    for name, prof in profiles.items():
        row[f"{name}_aten_calls"] = prof["aten_calls"]
        row[f"{name}_matmul_share"] = prof["matmul_share"]
        row[f"{name}_matmul_floor_s"] = round(t[name] * prof["matmul_share"], 4)
    row["ratio_at_our_matmul_floor"] = round(t["peer"] / row["ours_matmul_floor_s"], 2)
    return row


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--peer", required=True, type=Path, help="a checkout of alexojica/JetFormer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--skip", default="",
                   help="comma list of parts to skip: train,sample,floors")
    p.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks" / "results" / "peer_compare.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # 1 thread: this process's CPU time (other processes on a shared machine do not count)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    peer = import_peer(args.peer.resolve())
    images, labels = fixed_batch()
    skip = set(filter(None, args.skip.split(",")))
    results = {"train_step": {}, "sampling": {}}
    for name in args.sizes.split(","):
        size = SIZES[name]
        if "train" not in skip:
            ours, n_ours = our_step_fn(size, images, labels, False)
            theirs, n_peer = peer_step_fn(peer, size, images, labels)
            fns = {"ours": ours, "peer": theirs}
            if args.compile:
                fns["ours_compiled"] = our_step_fn(size, images, labels, True)[0]
            t = interleaved_medians(fns, args.repeats, clock=clock)
            row = {"ours_s": round(t["ours"], 4), "peer_s": round(t["peer"], 4),
                   "ratio": round(t["peer"] / t["ours"], 2), "params_ours": n_ours,
                   "params_peer": n_peer}
            if "floors" not in skip:
                row.update(floors(t, {k: op_profile(fns[k]) for k in ("ours", "peer")}))
            if args.compile:
                row.update(ours_compiled_s=round(t["ours_compiled"], 4),
                           ratio_compiled=round(t["peer"] / t["ours_compiled"], 2))
            results["train_step"][name] = row
            print(name, "train step", json.dumps(row), flush=True)
        if "sample" not in skip and name == "tiny":
            for scale in (0.0, 5.0):
                fns = {"ours": our_sample_fn(size, args.samples, scale),
                       "peer": peer_sample_fn(peer, size, args.samples, scale)}
                t = interleaved_medians(fns, max(3, args.repeats // 2), warmup=1, clock=clock)
                row = {"ours_s": round(t["ours"], 4), "peer_s": round(t["peer"], 4),
                       "ratio": round(t["peer"] / t["ours"], 2)}
                if "floors" not in skip:
                    row.update(floors(t, {k: op_profile(fns[k]) for k in fns}))
                results["sampling"][f"{name}_cfg{scale:g}"] = row
                print(name, f"sampling {args.samples} images cfg {scale:g}", json.dumps(row),
                      flush=True)
    report = {"benchmark": "peer_compare", "peer": "github.com/alexojica/JetFormer",
              "peer_commit": _git_head(args.peer), "threads": args.threads,
              "repeats": args.repeats, "samples": args.samples, "batch": BATCH,
              "statistic": "median time, contenders interleaved",
              "clock": "process_time" if args.threads == 1 else "perf_counter (wall)",
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_avg_1min_after": round(os.getloadavg()[0], 2), "torch": torch.__version__,
              **results}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


def _git_head(path: Path) -> str | None:
    head = path / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (path / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


if __name__ == "__main__":
    main()
