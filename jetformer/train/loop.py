"""One worker's training loop (Ray Train runs it on every worker; Ray Tune trials call it with
world_size 1). Nothing here imports Ray: distribution is plain `torch.distributed` (the caller
initialises the process group when world_size > 1), reporting goes through callbacks.

Per update (JetFormer §3.2-3.3): a batch of this worker's part of the training data -> RGB noise at
`sigma_at(progress)` -> `JetFormer.compute_loss` (bf16 autocast on CUDA only) -> backward (DDP
averages gradients) -> clip at `train.grad_clip` -> AdamW -> warm-up + cosine lr -> EMA.
With `train.flow_pretrain_steps` = P > 0 (the two-stage ablation, paper Table 2) the first P
updates train the flow alone against N(0, I) (`flow_prior_loss`), then the flow is frozen and
the rest is trained; each stage has its own warm-up + cosine schedule and noise curriculum.

Every `train.log_every` updates each rank passes the same row of curves to `progress`; every
`train.checkpoint_every` updates (and at the end) every rank computes its share of the val
metrics and calls `reporter(metrics, checkpoint_dir)` — rank 0 with a directory holding
`state.pt`, the others with None — equally often on every rank (Ray's report is a barrier).
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jetformer.config import Config
from jetformer.data.loader import BatchLoader, BatchStream, make_batch  # noqa: F401 (re-export)
from jetformer.noise import sigma_at
from jetformer.train import checkpoint as ckpt
from jetformer.train.optim import build_optimizer, build_scheduler, clip_gradients

Reporter = Callable[[dict, "str | None"], None]

CURVE_KEYS = ("loss", "bits_per_dim", "text_nll", "logdet_per_dim", "prior_nll_per_dim")
SAMPLES_PER_PROMPT = 4


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf: training stops, the last checkpoint stays."""


# ----------------------------------------------------------------------------- data
def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- set-up
def pick_device(cfg: Config) -> torch.device:
    if cfg.train.use_gpu != "false" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if cfg.train.use_gpu == "true":
        raise RuntimeError("train.use_gpu=true but CUDA is not available on this worker")
    return torch.device("cpu")


def load_inputs(cfg: Config) -> dict:
    """Tokenizer, vocabulary size, number of classes and PCA of the prepared data (paths as in
    `cfg`; the launcher makes them absolute). Raises FileNotFoundError naming what is missing."""
    from jetformer.data.dataset import read_metadata
    meta = read_metadata(cfg.data.prepared_dir)
    tokenizer, vocab_size = None, 4
    if cfg.model.conditioning == "text":
        from jetformer.data.tokenizer import TextTokenizer
        tokenizer = TextTokenizer(cfg.tokenizer.out_path)
        vocab_size = tokenizer.vocab_size
    num_classes = 0
    if cfg.model.conditioning == "class":
        num_classes = cfg.model.num_classes or len(meta["classes"])
    pca = None
    if cfg.model.factoring == "pca":
        from jetformer.data.pca import load_pca
        pca = load_pca(cfg.pca.out_path)
    return {"tokenizer": tokenizer, "vocab_size": vocab_size, "num_classes": num_classes,
            "pca": pca, "classes": meta["classes"]}


class _Objective(nn.Module):
    """What DDP wraps: one call = one loss (DDP hooks need a `forward`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, sigma_rgb: float, generator, flow_only: bool) -> dict:
        if flow_only:  # two-stage ablation, stage 1
            return {"loss": self.model.flow_prior_loss(batch["images"], sigma_rgb, generator)}
        return self.model.compute_loss(batch, sigma_rgb, train=True, generator=generator)


@dataclass
class Stage:
    name: str            # "flow" (two-stage ablation, stage 1) | "joint"
    start: int           # first update of the stage
    length: int          # updates in the stage

    def progress(self, step: int) -> float:
        """Training progress in [0, 1] within the stage (drives the noise curriculum)."""
        return (step - self.start) / self.length


def stages(cfg: Config) -> list[Stage]:
    p = cfg.train.flow_pretrain_steps
    joint = Stage("joint", p, cfg.train.steps - p)
    return [Stage("flow", 0, p), joint] if p > 0 else [joint]


def stage_at(cfg: Config, step: int) -> Stage:
    return [s for s in stages(cfg) if s.start <= step][-1]


# ----------------------------------------------------------------------------- the loop
class _Trainer:
    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device | None):
        t = cfg.train
        if t.batch_size % world_size:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by "
                             f"world_size={world_size}")
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("train_loop: world_size > 1 needs an initialised torch.distributed "
                               "process group (Ray Train sets it up)")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device or pick_device(cfg)
        self.local_batch = t.batch_size // world_size
        inputs = load_inputs(cfg)
        self.tokenizer, self.inputs = inputs["tokenizer"], inputs

        torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts)
        self.model = ckpt.build_model(cfg, inputs["vocab_size"], inputs["num_classes"],
                                      inputs["pca"]).to(self.device)
        self.ema = None
        if cfg.model.ema_decay > 0:
            from jetformer.models.ema import EMA
            self.ema = EMA(self.model, cfg.model.ema_decay)

        # per-rank randomness: dropout (global RNG), noise/order draws (step_gen), all saved in
        # checkpoints; a training batch's captions and flips are seeded by its position
        # (BatchLoader); data_gen / flip_gen serve direct dataset reads
        rank_seed = t.seed * 7919 + 1000 * (rank + 1)
        torch.manual_seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        random.seed(rank_seed)
        self.step_gen = torch.Generator(device=self.device).manual_seed(rank_seed + 1)
        self.data_gen = torch.Generator().manual_seed(rank_seed + 2)
        self.flip_gen = torch.Generator().manual_seed(rank_seed + 3)

        from jetformer.data.dataset import ArrowImageDataset
        self.train_ds = ArrowImageDataset(cfg.data.prepared_dir, "train", rank, world_size,
                                          flip=cfg.data.flip, generator=self.flip_gen)
        self.val_ds = ArrowImageDataset(cfg.data.prepared_dir, "val", rank, world_size)
        if len(self.train_ds) == 0:
            raise ValueError(f"worker {rank} has no training examples (the train split is "
                             "smaller than train.num_workers?)")
        self.data_position = {"epoch": 0, "offset": 0}   # after the last consumed batch
        self._batches: BatchLoader | None = None

        self.step = 0
        self.history: list[dict] = []
        self.samples: dict[str, bytes] = {}
        self.train_time = 0.0            # seconds spent in updates, over all attempts
        self.last_checkpoint_step = 0
        self.stage: Stage | None = None
        self.optimizer = self.scheduler = self.objective = None

    # -- stages
    def enter_stage(self, stage: Stage) -> None:
        """Build the optimiser, schedule and (DDP) objective for `stage`."""
        self.stage = stage
        if stage.name == "joint" and self.cfg.train.flow_pretrain_steps > 0:
            for p in self.model.codec.parameters():   # the pretrained flow is frozen
                p.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if stage.name == "flow":
            params = [p for p in self.model.codec.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.cfg.train, params)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, stage.length)
        objective = _Objective(self.model)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # some parameters sit out a batch (e.g. the flow when every row is image-first)
            objective = DDP(objective, device_ids=ids, find_unused_parameters=True)
        if self.cfg.train.compile:   # same maths (tests/test_speed_parity.py), compiled kernels
            objective = torch.compile(objective)
        self.objective = objective

    # -- state
    def rank_state(self) -> dict:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": ckpt.numpy_rng_state(), "python": random.getstate(),
                "step_gen": self.step_gen.get_state(), "data_gen": self.data_gen.get_state(),
                "flip_gen": self.flip_gen.get_state(), "data_position": dict(self.data_position)}

    def load_rank_state(self, s: dict) -> None:
        torch.set_rng_state(s["torch"])
        if s["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        ckpt.set_numpy_rng_state(s["numpy"])
        random.setstate(s["python"])
        self.step_gen.set_state(s["step_gen"])
        self.data_gen.set_state(s["data_gen"])
        self.flip_gen.set_state(s["flip_gen"])
        self.data_position = {k: int(v) for k, v in s["data_position"].items()}
        self.close_loader()

    def gather_rank_states(self) -> list[dict]:
        mine = self.rank_state()
        if self.world_size == 1:
            return [mine]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, mine)
        return out

    def state(self, rank_states: list[dict], metrics: dict) -> dict:
        return {"step": self.step, "stage": self.stage.name,
                "config": self.cfg.to_dict(), "config_hash": ckpt.training_hash(self.cfg),
                "vocab_size": self.inputs["vocab_size"], "num_classes": self.inputs["num_classes"],
                "pca": self.inputs["pca"], "world_size": self.world_size,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rank_states": rank_states, "history": self.history, "samples": self.samples,
                "train_time_s": self.train_time, "metrics": metrics}

    def restore(self, checkpoint_dir: str) -> None:
        s, used = ckpt.load_state_or_previous(checkpoint_dir)   # truncated newest -> previous
        checkpoint_dir = str(used)
        if s["config_hash"] != ckpt.training_hash(self.cfg):
            raise ValueError(f"{checkpoint_dir}: checkpoint of a different training config "
                             f"({s['config_hash']} != {ckpt.training_hash(self.cfg)})")
        if s["world_size"] != self.world_size:
            raise ValueError(f"{checkpoint_dir}: written by {s['world_size']} workers, resuming "
                             f"with {self.world_size}: per-worker data order and RNG cannot "
                             "carry over")
        self.model.load_state_dict(s["model"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
        self.step = self.last_checkpoint_step = int(s["step"])
        self.enter_stage(stage_at(self.cfg, min(self.step, self.cfg.train.steps - 1)))
        if self.stage.name == s["stage"]:   # else: the checkpoint closed stage 1 -> fresh stage 2
            self.optimizer.load_state_dict(s["optimizer"])
            self.scheduler.load_state_dict(s["scheduler"])
        self.load_rank_state(s["rank_states"][self.rank])
        self.history, self.samples = list(s["history"]), dict(s["samples"])
        self.train_time = float(s["train_time_s"])

    # -- data
    def next_batch(self) -> dict:
        """The next training batch on the device, from a `BatchLoader` started at the position
        of the last consumed batch (`data_position` is what a checkpoint resumes from)."""
        if self._batches is None:
            t = self.cfg.train
            self._batches = BatchLoader(
                self.train_ds, self.local_batch, seed=t.seed, rank=self.rank,
                conditioning=self.model.conditioning, tokenizer=self.tokenizer,
                max_text_len=self.cfg.tokenizer.max_text_len, position=self.data_position,
                workers=t.loader_workers, prefetch=t.loader_prefetch,
                pin_memory=self.device.type == "cuda")
        batch, self.data_position = next(self._batches)
        return _to(batch, self.device)

    def close_loader(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def epoch(self) -> float:
        """Epochs of this worker's part consumed so far."""
        return self.data_position["epoch"] + self.data_position["offset"] / len(self.train_ds)

    # -- evaluation pieces
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _averaged(self):
        return self.ema.averaged(self.model) if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def validate(self) -> dict:
        """Val bits/dim (text-first rows: image given its caption or class; no curriculum noise)
        and val text NLL (image-first rows), over `train.val_images` images split across ranks."""
        from jetformer.models.jetformer import eval_mode
        n = min(len(self.val_ds), math.ceil(self.cfg.train.val_images / self.world_size))
        sums = torch.zeros(4, dtype=torch.float64)  # bpd*n, n, nll*n, n
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._averaged(), eval_mode(self.model):
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 17)
            data_gen = torch.Generator().manual_seed(self.cfg.train.seed + 17)
            for i in range(0, n, self.local_batch):
                items = [self.val_ds[j] for j in range(i, min(i + self.local_batch, n))]
                batch = _to(make_batch(items, self.model.conditioning, self.tokenizer,
                                       self.cfg.tokenizer.max_text_len, data_gen), self.device)
                B = len(items)
                with self._autocast():
                    out = self.model.compute_loss(
                        {**batch, "image_first": torch.zeros(B, dtype=torch.bool)}, 0.0,
                        train=False, generator=gen)
                    sums[0] += float(out["image_bpd"]) * B
                    sums[1] += B
                    if self.model.conditioning == "text":
                        out = self.model.compute_loss(
                            {**batch, "image_first": torch.ones(B, dtype=torch.bool)}, 0.0,
                            train=False, generator=gen)
                        sums[2] += float(out["text_nll"]) * B
                        sums[3] += B
        if self.world_size > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        val = {}
        if sums[1] > 0:
            val["val_bits_per_dim"] = float(sums[0] / sums[1])
        if sums[3] > 0:
            val["val_text_nll"] = float(sums[2] / sums[3])
        return val

    @torch.no_grad()
    def add_samples(self) -> None:
        """Rank 0: a grid for a few val captions/classes, kept in the state (`samples`)."""
        from jetformer.train.samples import sample_grid
        k = min(self.cfg.train.sample_prompts, len(self.val_ds))
        if k == 0:
            return
        items = [self.val_ds[i] for i in range(k)]
        t = self.cfg.train
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._averaged():
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 29)
            png, listing = sample_grid(self.model, items, self.tokenizer,
                                       self.cfg.tokenizer.max_text_len, SAMPLES_PER_PROMPT,
                                       t.sample_cfg_scale, t.sample_temperature, gen)
        name = f"samples_step{self.step:06d}"
        header = (f"step {self.step}: {SAMPLES_PER_PROMPT} samples per row, cfg_scale "
                  f"{t.sample_cfg_scale}, temperature {t.sample_temperature}\n")
        self.samples[f"{name}.png"] = png
        self.samples[f"{name}.txt"] = (header + listing).encode()

    # -- one update
    def update(self, batch: dict) -> dict:
        t = self.cfg.train
        sigma = sigma_at(self.stage.progress(self.step), t.noise)
        lr = self.optimizer.param_groups[0]["lr"]
        with self._autocast():
            out = self.objective(batch, sigma, self.step_gen, self.stage.name == "flow")
        loss = out["loss"]
        # [sum, count] per curve key, summed over ranks: global means + one finiteness check
        # (one device->host copy per update)
        nan = torch.tensor(float("nan"), device=self.device)
        vals = torch.stack([out[k].detach().float() if k in out else nan
                            for k in ("loss", "image_bpd", "text_nll", "logdet_per_dim",
                                      "prior_nll_per_dim")])
        counted = torch.isfinite(vals)
        counted[0] = True                      # the loss counts even when it is NaN
        stats = torch.stack([torch.where(counted, vals, 0.0), counted.float()], 1).flatten()
        stats = stats.double()
        if self.world_size > 1:
            dist.all_reduce(stats)
        stats = stats.cpu()
        if not math.isfinite(float(stats[0])):
            raise NonFiniteLossError(
                f"non-finite loss ({float(stats[0]) / self.world_size}) at update "
                f"{self.step + 1}: stopping. The last good checkpoint (update "
                f"{self.last_checkpoint_step}) is kept; lower train.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.model.parameters(), t.grad_clip)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at update {self.step + 1}: stopping. The last good "
                f"checkpoint (update {self.last_checkpoint_step}) is kept; lower train.lr")
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        means = {}
        for i, k in enumerate(CURVE_KEYS):
            s, c = float(stats[2 * i]), float(stats[2 * i + 1])
            means[k] = s / c if c > 0 else float("nan")
        if self.stage.name == "flow":  # stage 1 trains the flow's own bits/dim
            means["bits_per_dim"] = means["loss"]
        return {**means, "sigma_rgb": sigma, "lr": lr, "grad_norm": grad_norm}


def _mean_rows(rows: list[dict]) -> dict:
    """Curves averaged over a log interval; schedules (lr, sigma) at its last update."""
    out = {"sigma_rgb": rows[-1]["sigma_rgb"], "lr": rows[-1]["lr"]}
    for k in rows[-1]:
        if k in out:
            continue
        vals = [r[k] for r in rows if math.isfinite(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def train_loop(cfg: Config, *, rank: int, world_size: int, reporter: Reporter,
               progress: Callable[[dict], None] | None = None, resume_from: str | None = None,
               device: torch.device | None = None) -> dict:
    """Train `cfg` as worker `rank` of `world_size`; returns the final metrics.

    reporter(metrics, checkpoint_dir): called on every rank at every checkpoint step (rank 0
      passes a temporary directory holding `state.pt`, deleted when the call returns; copy it
      to keep it), always at the last step.
    progress(row): every rank (rows are global means, the same on every rank), every
      `train.log_every` updates: step, loss, bits/dim, text NLL, log-det and prior NLL per dim,
      sigma, lr, grad norm, examples/s, ETA; also `{"event": "start" | "val", ...}` rows.
    resume_from: a checkpoint directory (`state.pt`) to continue from.
    device: default CUDA when available (and `train.use_gpu` allows), else CPU.
    """
    t = cfg.train
    tr = _Trainer(cfg, rank, world_size, device)
    if resume_from is not None:
        tr.restore(resume_from)
    else:
        tr.enter_stage(stage_at(cfg, 0))
    if progress is not None:
        progress({"event": "start", "step": tr.step, "total_steps": t.steps,
                  "resumed": resume_from is not None, "device": str(tr.device),
                  "world_size": world_size})

    interval: list[dict] = []
    interval_time, interval_start = 0.0, time.perf_counter()
    metrics: dict = dict(tr.history[-1]) if tr.history else {}
    while True:
        done = tr.step >= t.steps
        if not done:
            stage = stage_at(cfg, tr.step)
            if stage.name != tr.stage.name:
                tr.enter_stage(stage)
            t0 = time.perf_counter()
            row = tr.update(tr.next_batch())
            if tr.device.type == "cuda":
                torch.cuda.synchronize(tr.device)
            dt = time.perf_counter() - t0
            tr.train_time += dt
            interval_time += dt
            interval.append(row)
            if tr.step % t.log_every == 0 or tr.step == t.steps:
                wall = time.perf_counter() - interval_start
                row = {"step": tr.step, "stage": 0 if tr.stage.name == "flow" else 1,
                       **_mean_rows(interval),
                       "examples_per_s": len(interval) * t.batch_size / max(interval_time, 1e-9),
                       "epoch": tr.epoch()}
                tr.history.append(row)
                metrics = dict(row)
                if progress is not None:
                    eta = (t.steps - tr.step) * wall / len(interval)
                    progress({**row, "total_steps": t.steps, "eta_s": eta})
                interval, interval_time, interval_start = [], 0.0, time.perf_counter()
        is_last = tr.step >= t.steps
        sample_now = t.sample_every > 0 and tr.step % t.sample_every == 0
        if done or is_last or tr.step % t.checkpoint_every == 0 or sample_now:
            if done and tr.last_checkpoint_step == tr.step and resume_from is not None \
                    and tr.history and "val_bits_per_dim" in tr.history[-1]:
                metrics = dict(tr.history[-1])  # resumed a finished run: report it again
            else:
                val = tr.validate()
                metrics = {**metrics, "step": tr.step, **val}
                if progress is not None and val:
                    progress({"event": "val", "step": tr.step, **val})
                if tr.history and tr.history[-1]["step"] == tr.step:
                    tr.history[-1].update({k: v for k, v in metrics.items()
                                           if k.startswith("val_")})
                if rank == 0 and (is_last or sample_now):
                    tr.add_samples()
            metrics.update(train_time_s=tr.train_time, done=is_last,
                           examples_seen=tr.step * t.batch_size,
                           examples_per_s_mean=tr.step * t.batch_size / max(tr.train_time, 1e-9))
            rank_states = tr.gather_rank_states()
            tmp = None
            try:
                if rank == 0:
                    tmp = tempfile.mkdtemp(prefix="jetformer-ckpt-")
                    ckpt.save_state(tmp, tr.state(rank_states, metrics))
                reporter(metrics, tmp)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
            tr.last_checkpoint_step = tr.step
            interval_start = time.perf_counter()
        if is_last:
            tr.close_loader()
            return metrics
