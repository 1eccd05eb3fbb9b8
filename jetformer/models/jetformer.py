"""JetFormer: one decoder-only transformer over text tokens and flow-encoded soft image tokens
(paper §3; big_vision `models/proj/jetformer/jetformer.py` and `loss_fn` in
`trainers/proj/jetformer/train.py`).

Sequences (teacher forcing: the input is the sequence without its last token, the target the
sequence without its first):

  class-conditional   [BOS, c_1 .. c_C, BOI, img_1 .. img_N]     (C = num_class_tokens)
  text first (T2I)    [BOS, t_1 .. t_T, BOI, img_1 .. img_N]
  image first (I2T)   [BOI, img_1 .. img_N, BOS, t_1 .. t_T]

Only the second modality is scored (paper §3.4): image bits/dim for text-first rows,
`text_loss_weight` x text NLL (nats per token) for image-first rows. Text padding is masked out
of attention and RoPE positions are `cumsum(valid) - 1`, so a padded row computes exactly what
the unpadded row would. Text ids come from the tokenizer (pad 0, unk 1, bos 2, eos 3); the text
embedding table has two extra rows, [BOI] = vocab_size and [NOLABEL] = vocab_size + 1. A class
label is embedded by C separate tables (row `num_classes` of each is its [NOLABEL]).

Image NLL (paper eq. 1 with the factored-out dims of §3.2), every one of the H*W*3 dimensions
scored exactly once:
  bpd = (NLL_gmm(tokens) + NLL_prior(rest) - logdet) / (H*W*3) / ln 2 + log2(127.5)
(the prior of `rest`: `ImageCodec.prior_nll`, N(0, I) or a learnt diagonal Gaussian)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetformer.noise import bits_per_dim, curriculum_noise, from_model_space, to_model_space

from .factoring import ImageCodec, standard_normal_nll
from .gmm import GMMHead, gmm_cfg_sample, gmm_nll
from .transformer import Decoder, init_linear

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TASKS = ("t2i", "i2t", "both", "class")


@dataclass(frozen=True)
class Objective:
    """Settings of the training objective that are not part of the network (`cfg.train`).

    task: the order of each training row: "t2i" text first (the image is scored), "i2t" image
      first (the text is scored), "both" 50/50 per row, "class" class-conditional (class first).
    cfg_drop_prob: probability that a text-first row's condition is replaced by [NOLABEL]
      (trains the unconditional stream of CFG; big_vision `Model.get_drop_labels`).
    text_loss_weight: weight of the text NLL (nats/token) against the image bits/dim."""
    task: str
    cfg_drop_prob: float
    text_loss_weight: float

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"train.task={self.task!r}: must be one of {list(TASKS)}")

    @classmethod
    def from_config(cls, cfg) -> Objective:
        t = cfg.train
        return cls(task=t.task, cfg_drop_prob=t.cfg_drop_prob,
                   text_loss_weight=t.text_loss_weight)


@dataclass
class _LossBatch:
    """The inputs of `compute_loss`, checked and on the model's device."""
    images: torch.Tensor                    # uint8 [B, H, W, 3]
    image_first: torch.Tensor | None        # bool [B] from the batch; None: drawn per task
    text: torch.Tensor | None               # long [B, T] (text models)
    text_mask: torch.Tensor | None          # bool [B, T], valid text tokens
    target_mask: torch.Tensor | None        # bool [B, T], the text targets that are scored
    labels: torch.Tensor | None             # [B] (class models)

    def condition(self, rows: torch.Tensor) -> tuple:
        """(text, text_mask, labels) of `rows`, None where absent: `_condition`'s inputs."""
        return tuple(None if x is None else x[rows]
                     for x in (self.text, self.text_mask, self.labels))


@dataclass
class _TextFirst:
    """Text-first rows [BOS, condition, BOI, img_1..img_{N-1}]: the image is scored."""
    h: torch.Tensor                         # [b, L, W] decoder input
    valid: torch.Tensor                     # bool [b, L]
    tokens: torch.Tensor                    # [b, N, d] targets (with the latent noise)
    rest: torch.Tensor                      # [b, N, D - d] factored-out dims
    logdet: torch.Tensor                    # [b]
    cond_len: int                           # C or T: the image outputs start at cond_len + 1


@dataclass
class _ImageFirst:
    """Image-first rows [BOI, img_1..img_N, BOS, t_1..t_{T-1}]: the text is scored."""
    h: torch.Tensor                         # [b, L, W] decoder input
    valid: torch.Tensor                     # bool [b, L]
    text: torch.Tensor                      # long [b, T] targets
    target_mask: torch.Tensor               # bool [b, T]


@contextmanager
def eval_mode(module: nn.Module):
    """Temporarily switch off dropout (restores the previous mode afterwards). A no-op when no
    submodule is training (eval()/train() walk every submodule: ms for the flow's hundreds)."""
    if not any(m.training for m in module.modules()):
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions of a padded row: cumsum(valid) - 1 (pads get the previous position)."""
    return (valid.long().cumsum(dim=1) - 1).clamp_min(0)


class JetFormer(nn.Module):
    """Flow (`codec`) + Gemma decoder + GMM image head + softmax text head (paper Fig. 1).

    `model_cfg`: the model section of the config; `objective`: the loss settings;
    `resolution`: the image side; `max_text_len`: text length of the [NOLABEL] prefix;
    `seed`: initialises the flow's permutations (and W). `from_config` builds it from a Config."""

    def __init__(self, model_cfg, objective: Objective, *, resolution: int, max_text_len: int,
                 seed: int, vocab_size: int, num_classes: int = 0, pca: dict | None = None):
        super().__init__()
        m = model_cfg
        if vocab_size <= EOS_ID:
            raise ValueError(f"JetFormer: vocab_size must be > {EOS_ID} (pad 0, unk 1, bos 2, "
                             f"eos 3 are reserved), got {vocab_size}")
        if (objective.task == "class") != (m.conditioning == "class"):
            raise ValueError(f"train.task={objective.task!r} does not fit a "
                             f"{m.conditioning}-conditional model")
        self.objective = objective
        self.max_text_len = max_text_len
        self.latent_noise_max = m.latent_noise_max
        self.conditioning = m.conditioning
        self.codec = ImageCodec(m, resolution, seed, pca)
        self.num_image_tokens = self.codec.num_tokens                # N
        self.factored_dims = self.codec.factored_dims                # d
        self.num_image_dims = 3 * resolution ** 2                    # H*W*3, denominator of bpd
        width = m.decoder.width

        self.vocab_size = vocab_size
        self.boi_id, self.nolabel_id = vocab_size, vocab_size + 1
        # N(0, 1) init, no sqrt(width) scaling of the text embedding (big_vision jetformer Model)
        self.text_embed = nn.Embedding(vocab_size + 2, width)
        nn.init.normal_(self.text_embed.weight, std=1.0)

        self.num_classes = 0
        self.num_class_tokens = m.num_class_tokens
        if self.conditioning == "class":
            self.num_classes = num_classes or m.num_classes
            if self.num_classes <= 0:
                raise ValueError("JetFormer: model.conditioning='class' needs the number of "
                                 "classes (model.num_classes or the num_classes argument), got 0")
            # C tables of (num_classes + 1) rows each; row num_classes = [NOLABEL]
            self.class_embed = nn.Embedding(self.num_class_tokens * (self.num_classes + 1), width)
            nn.init.normal_(self.class_embed.weight, std=1.0)
            self.register_buffer("class_offsets", torch.arange(self.num_class_tokens)
                                 * (self.num_classes + 1), persistent=False)

        self.image_embed = nn.Linear(self.factored_dims, width)     # soft token -> width
        init_linear(self.image_embed)
        dc = m.decoder
        self.decoder = Decoder(dc.width, dc.depth, dc.num_heads, dc.head_dim, dc.mlp_dim,
                               dc.dropout, dc.rope_base)
        self.gmm_head = GMMHead(width, self.factored_dims, m.num_mixtures)
        self.text_head = None
        if self.conditioning == "text":
            # untied softmax head over the text vocabulary (official image-text config:
            # untie_output_vocab=True); variance 1/width init keeps the first logits O(1)
            self.text_head = nn.Linear(width, vocab_size, bias=False)
            init_linear(self.text_head)

    @classmethod
    def from_config(cls, cfg, vocab_size: int, num_classes: int = 0,
                    pca: dict | None = None) -> JetFormer:
        """The model of a full Config: the one place that reads its sections for the model."""
        return cls(cfg.model, Objective.from_config(cfg), resolution=cfg.data.resolution,
                   max_text_len=cfg.tokenizer.max_text_len, seed=cfg.seed,
                   vocab_size=vocab_size, num_classes=num_classes, pca=pca)

    # ------------------------------------------------------------------ embeddings / layouts
    @property
    def device(self) -> torch.device:
        return self.text_embed.weight.device

    def _special(self, token_id: int, batch: int) -> torch.Tensor:
        """Embedding of one special token, [B, 1, W]."""
        return self.text_embed.weight[token_id].view(1, 1, -1).expand(batch, 1, -1)

    def _condition(self, text, text_mask, labels, drop):
        """The prefix condition: class tokens [B, C, W] or text [B, T, W], plus validity [B, .].

        drop bool [B] (or None) replaces the condition by [NOLABEL] (CFG): all C tables'
        [NOLABEL] rows, or T [NOLABEL] text tokens that are all valid (as big_vision does)."""
        if self.conditioning == "class":
            if labels is None:
                raise ValueError("class-conditional JetFormer needs `labels` (long [B])")
            labels = labels.to(self.device).long()
            if labels.ndim != 1 or (labels < 0).any() or (labels >= self.num_classes).any():
                raise ValueError(f"labels must be long [B] in [0, {self.num_classes}), got shape "
                                 f"{tuple(labels.shape)} values {labels.tolist()[:8]}")
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            ids = labels[:, None] + self.class_offsets                         # [B, C]
            h = self.class_embed(ids)                                          # [B, C, W]
            return h, torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        if text is None:
            raise ValueError("text-conditional JetFormer needs `text` (long [B, T])")
        text, text_mask = self._text_and_mask(text, text_mask)
        h = self.text_embed(text)                                              # [B, T, W]
        if drop is not None:
            nolabel = self._special(self.nolabel_id, text.shape[0])
            h = torch.where(drop[:, None, None], nolabel, h)
            text_mask = text_mask | drop[:, None]
        return h, text_mask

    def _text_and_mask(self, text, text_mask):
        """text long [B, T] and its validity mask bool [B, T] (default: not PAD) on the device."""
        text = text.to(self.device).long()
        text_mask = (text != PAD_ID) if text_mask is None else text_mask.to(self.device).bool()
        if text.ndim != 2 or text_mask.shape != text.shape:
            raise ValueError(f"text must be long [B, T] with a bool text_mask of the same shape, "
                             f"got {tuple(text.shape)} and {tuple(text_mask.shape)}")
        return text, text_mask

    def _unconditional(self, batch: int, text_len: int | None = None):
        """The [NOLABEL] condition for `batch` rows (CFG's unconditional stream)."""
        drop = torch.ones(batch, dtype=torch.bool, device=self.device)
        if self.conditioning == "class":
            labels = torch.zeros(batch, dtype=torch.long, device=self.device)
            return self._condition(None, None, labels, drop)
        T = text_len or self.max_text_len
        text = torch.full((batch, T), PAD_ID, dtype=torch.long, device=self.device)
        return self._condition(text, None, None, drop)

    def _text_first_prefix(self, cond_h, cond_valid):
        """[BOS, condition, BOI] -> (h [B, T+2, W], valid [B, T+2])."""
        B = cond_h.shape[0]
        h = torch.cat([self._special(BOS_ID, B), cond_h, self._special(self.boi_id, B)], dim=1)
        ones = torch.ones(B, 1, dtype=torch.bool, device=cond_valid.device)
        return h, torch.cat([ones, cond_valid, ones], dim=1)

    def _text_first_sequence(self, cond_h, cond_valid, tokens):
        """Teacher-forced input [BOS, condition, BOI, img_1..img_{N-1}] -> (h, valid)."""
        h, valid = self._text_first_prefix(cond_h, cond_valid)
        h = torch.cat([h, self.image_embed(tokens[:, :-1])], dim=1)
        valid = torch.cat([valid, valid.new_ones(tokens.shape[0], tokens.shape[1] - 1)], dim=1)
        return h, valid

    def _image_first_prefix(self, tokens):
        """[BOI, img_1..img_N, BOS] -> (h [B, N+2, W], valid [B, N+2])."""
        B, N, _ = tokens.shape
        h = torch.cat([self._special(self.boi_id, B), self.image_embed(tokens),
                       self._special(BOS_ID, B)], dim=1)
        return h, torch.ones(B, N + 2, dtype=torch.bool, device=h.device)

    def _image_first_sequence(self, tokens, text, text_mask):
        """Teacher-forced input [BOI, img_1..img_N, BOS, t_1..t_{T-1}] -> (h, valid)."""
        h, valid = self._image_first_prefix(tokens)
        h = torch.cat([h, self.text_embed(text[:, :-1])], dim=1)
        return h, torch.cat([valid, text_mask[:, :-1]], dim=1)

    def _decode(self, h, valid, cache=None):
        return self.decoder(h, _positions(valid), cache=cache, attn_mask=valid)[0]

    # ------------------------------------------------------------------ image <-> tokens
    def _encode_clean(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> soft tokens [B, N, d] for use as a prefix (captioning, scoring): no
        curriculum noise, and the dequantisation noise replaced by its mean (deterministic)."""
        x = to_model_space(images.to(self.device), dequantize=False) + 0.5 / 127.5
        return self.codec.encode(x)[0]

    def _text_first_image_nll(self, out, tokens, rest, logdet, cond_len):
        """Image NLL (nats) per row from the decoder output of a text-first sequence:
        (NLL_gmm of the tokens, NLL_prior of `rest`, their sum - logdet), each [B]."""
        N = self.num_image_tokens
        img_out = out[:, cond_len + 1: cond_len + 1 + N]                      # BOI..img_{N-1}
        logits, means, scales = self.gmm_head(img_out)                         # [B,N,K], [B,N,K,d]
        nll_gmm = gmm_nll(logits, means, scales, tokens).sum(dim=1)           # [B]
        nll_rest = self.codec.prior_nll(rest)                                  # [B]
        return nll_gmm, nll_rest, nll_gmm + nll_rest - logdet

    def _image_first_text_logits(self, out, text_len):
        """Text logits [B, T, V] from the decoder output of an image-first sequence."""
        N = self.num_image_tokens
        return self.text_head(out[:, N + 1: N + 1 + text_len]).float()        # BOS..t_{T-1}

    # ------------------------------------------------------------------ training loss
    def compute_loss(self, batch: dict, sigma_rgb: float, train: bool = True,
                     generator: torch.Generator | None = None) -> dict:
        """The loss on each row's second modality, averaged over the batch (paper §3.4):
        image bits/dim (eq. 1) on text-first rows, text_loss_weight x text NLL on image-first.

        batch: `images` uint8 [B,H,W,3]; `text` long [B,T] + `text_mask` bool [B,T] (text models);
        `labels` long [B] (class models); optional `image_first` bool [B] and `text_loss_mask`
        bool [B,T]. `train` enables the RGB curriculum noise (sigma_rgb, pixel units, text-first
        rows only), the latent noise and the [NOLABEL] condition dropout; dequantisation is
        always on. Dropout follows the module's train()/eval() mode. Returns `loss` (with grad)
        and detached metrics: `image_bpd`, `text_nll` (nats/token), `logdet_per_dim` and
        `prior_nll_per_dim` (bits per image dim, over text-first rows; NaN when a batch has no row
        of that kind). The flow's log-det per dim is capped at num_couplings/2 bits.
        """
        inputs = self._loss_inputs(batch)
        B = inputs.images.shape[0]
        image_first = self._draw_image_first(inputs.image_first, B, generator)
        text_first_rows = (~image_first).nonzero().squeeze(1)
        image_first_rows = image_first.nonzero().squeeze(1)
        t2i = i2t = None        # random draws: text-first rows first, then image-first rows
        if len(text_first_rows):
            t2i = self._text_first_part(inputs, text_first_rows, sigma_rgb, train, generator)
        if len(image_first_rows):
            i2t = self._image_first_part(inputs, image_first_rows, generator)
        out_t2i, out_i2t = self._decode_parts(t2i, i2t)

        loss = torch.zeros((), device=self.device)
        image_bpd = nll_rest = text_nll = None
        if t2i is not None:
            image_bpd, nll_rest = self._image_nll(out_t2i, t2i)               # [b] bits/dim
            loss = loss + image_bpd.sum()
        if i2t is not None:
            text_nll = self._text_nll(out_i2t, i2t)                            # [b] nats/token
            loss = loss + self.objective.text_loss_weight * text_nll.sum()
        return {"loss": loss / B, **self._loss_metrics(t2i, image_bpd, nll_rest, text_nll)}

    def _loss_inputs(self, batch: dict) -> _LossBatch:
        """Check `compute_loss`'s batch (a clear error naming the bad key) and move it to the
        device; the class labels are checked by `_condition`."""
        images = batch.get("images")
        if images is None or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("batch['images'] must be uint8 [B, H, W, 3], got "
                             f"{None if images is None else (images.dtype, tuple(images.shape))}")
        images = images.to(self.device)
        B = images.shape[0]
        image_first = batch.get("image_first")
        if image_first is not None:
            image_first = torch.as_tensor(image_first)
            if self.conditioning == "class":
                if bool(image_first.any()):
                    raise ValueError("batch['image_first']: a class-conditional model has no "
                                     "image-first rows")
                image_first = None
            else:
                image_first = image_first.to(self.device).bool()
                if image_first.shape != (B,):
                    raise ValueError(f"batch['image_first'] must be bool [{B}], got shape "
                                     f"{tuple(image_first.shape)}")
        if self.conditioning == "class":
            labels = batch.get("labels")
            labels = None if labels is None else labels.to(self.device)
            return _LossBatch(images, image_first, None, None, None, labels)
        if batch.get("text") is None:
            raise ValueError("batch['text'] (long [B, T]) is required by a text model")
        text, text_mask = self._text_and_mask(batch["text"], batch.get("text_mask"))
        target_mask = text_mask
        if batch.get("text_loss_mask") is not None:
            loss_mask = batch["text_loss_mask"].to(self.device).bool()
            if loss_mask.shape != text.shape:
                raise ValueError(f"batch['text_loss_mask'] must be bool {tuple(text.shape)} like "
                                 f"batch['text'], got shape {tuple(loss_mask.shape)}")
            target_mask = text_mask & loss_mask
        return _LossBatch(images, image_first, text, text_mask, target_mask, None)

    def _draw_image_first(self, given: torch.Tensor | None, B: int, generator) -> torch.Tensor:
        """Which rows are image-first, bool [B]: `given` (the batch's), else by the task; "both"
        draws 50/50 per row (`text_prefix_prob` in big_vision `loss_fn`)."""
        if given is not None:
            return given
        task = self.objective.task
        if task in ("t2i", "class"):
            return torch.zeros(B, dtype=torch.bool, device=self.device)
        if task == "i2t":
            return torch.ones(B, dtype=torch.bool, device=self.device)
        return torch.rand(B, generator=generator, device=self.device) < 0.5   # "both"

    def _text_first_part(self, inputs: _LossBatch, rows, sigma_rgb, train, generator
                         ) -> _TextFirst:
        """The text-first rows' sequences; the image is scored. In training: the RGB noise
        curriculum (paper §3.3), the latent noise and the condition dropout. Random draws in
        this order: RGB noise, dequantisation, latent noise, condition dropout."""
        pixels = inputs.images[rows]
        if train and sigma_rgb > 0:
            pixels = curriculum_noise(pixels, float(sigma_rgb), generator)
        x = to_model_space(pixels, generator, dequantize=True)
        tokens, rest, logdet = self.codec.encode(x)                   # [b,N,d] [b,N,D-d] [b]
        if train and self.latent_noise_max > 0:
            tokens = self._latent_noise(tokens, generator)
        drop, p = None, self.objective.cfg_drop_prob
        if train and p > 0:
            drop = torch.rand(len(rows), generator=generator, device=self.device) < p
        cond_h, cond_valid = self._condition(*inputs.condition(rows), drop)
        h, valid = self._text_first_sequence(cond_h, cond_valid, tokens)
        return _TextFirst(h, valid, tokens, rest, logdet, cond_h.shape[1])

    def _latent_noise(self, tokens, generator):
        """tokens + sigma * N(0, I), sigma ~ U(0, latent_noise_max) per row: the same noisy
        tokens are the decoder's input AND the GMM's target (`input_noise_std` in big_vision
        `loss_fn`)."""
        std = self.latent_noise_max * torch.rand(tokens.shape[0], generator=generator,
                                                 device=self.device)
        noise = torch.randn(tokens.shape, generator=generator, device=self.device)
        return tokens + std[:, None, None] * noise.to(tokens.dtype)

    def _image_first_part(self, inputs: _LossBatch, rows, generator) -> _ImageFirst:
        """The image-first rows' sequences; the text is scored. The flow only encodes the prefix:
        no gradient reaches it (`stop_grad_nvp_prefix` in big_vision `loss_fn`), no noise but
        the dequantisation."""
        with torch.no_grad():
            tokens = self.codec.encode(to_model_space(inputs.images[rows], generator))[0]
        text, text_mask = inputs.text[rows], inputs.text_mask[rows]
        h, valid = self._image_first_sequence(tokens, text, text_mask)
        return _ImageFirst(h, valid, text, inputs.target_mask[rows])

    def _decode_parts(self, t2i: _TextFirst | None, i2t: _ImageFirst | None):
        """One decoder pass over the text-first rows stacked above the image-first rows; returns
        each part's outputs (None for an absent part)."""
        parts = [p for p in (t2i, i2t) if p is not None]
        if len({p.h.shape[1] for p in parts}) > 1:
            raise AssertionError("text-first and image-first sequences differ in length")
        out = self._decode(torch.cat([p.h for p in parts]), torch.cat([p.valid for p in parts]))
        n = 0 if t2i is None else t2i.h.shape[0]
        return (out[:n] if t2i is not None else None), (out[n:] if i2t is not None else None)

    def _image_nll(self, out, t2i: _TextFirst):
        """Image NLL of the text-first rows in bits/dim [b] (paper eq. 1), and the NLL of the
        factored-out dims in nats [b]."""
        _, nll_rest, nll = self._text_first_image_nll(out, t2i.tokens, t2i.rest, t2i.logdet,
                                                      t2i.cond_len)
        return bits_per_dim(nll, self.num_image_dims), nll_rest

    def _text_nll(self, out, i2t: _ImageFirst):
        """Text NLL of the image-first rows in nats per scored token [b]."""
        logits = self._image_first_text_logits(out, i2t.text.shape[1])         # [b, T, V]
        nll_tok = F.cross_entropy(logits.transpose(1, 2), i2t.text, reduction="none")  # [b, T]
        w = i2t.target_mask.float()
        return (nll_tok * w).sum(1) / w.sum(1).clamp_min(1.0)

    def _loss_metrics(self, t2i, image_bpd, nll_rest, text_nll) -> dict:
        """The detached batch means `compute_loss` reports (NaN for an absent row kind)."""
        nan = torch.tensor(float("nan"), device=self.device)
        metrics = {"image_bpd": nan, "text_nll": nan, "logdet_per_dim": nan,
                   "prior_nll_per_dim": nan}
        ln2_dims = math.log(2.0) * self.num_image_dims
        if t2i is not None:
            metrics.update(image_bpd=image_bpd.detach().mean(),
                           logdet_per_dim=(t2i.logdet.detach() / ln2_dims).mean(),
                           prior_nll_per_dim=(nll_rest.detach() / ln2_dims).mean())
        if text_nll is not None:
            metrics["text_nll"] = text_nll.detach().mean()
        return metrics

    def flow_prior_loss(self, images: torch.Tensor, sigma_rgb: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Two-stage ablation, stage 1 (paper Table 2): the flow alone against N(0, I) on its
        tokens, the factored-out dims under their own prior (`codec.prior_nll`). Returns the
        mean bits/dim (scalar, with grad)."""
        if self.codec.flow is None:
            raise ValueError("flow_prior_loss: model.factoring='no_flow' has no flow to pretrain")
        images = images.to(self.device)
        pixels = curriculum_noise(images, float(sigma_rgb), generator) if sigma_rgb > 0 else images
        tokens, rest, logdet = self.codec.encode(to_model_space(pixels, generator))
        nll = standard_normal_nll(tokens) + self.codec.prior_nll(rest) - logdet  # [B]
        return bits_per_dim(nll, self.num_image_dims).mean()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def image_bits_per_dim(self, images: torch.Tensor, generator: torch.Generator | None = None,
                           text=None, text_mask=None, labels=None) -> torch.Tensor:
        """Held-out NLL in bits/dim per image [B] (no curriculum or latent noise; dequantised).

        Conditioned on `text`/`labels` when given, else unconditional ([NOLABEL] prefix)."""
        with eval_mode(self):
            x = to_model_space(images.to(self.device), generator)
            tokens, rest, logdet, out, T = self.heldout_pass(x, text, text_mask, labels)
            nll = self._text_first_image_nll(out, tokens, rest, logdet, T)[2]
            return bits_per_dim(nll, self.num_image_dims)

    def heldout_pass(self, x: torch.Tensor, text=None, text_mask=None, labels=None):
        """The text-first pass over clean images in model space x [B, H, W, 3]: (tokens, rest,
        logdet, decoder outputs, condition length T); the image tokens' outputs start at T + 1.
        Conditioned on `text`/`labels` when given, else on the [NOLABEL] prefix."""
        tokens, rest, logdet = self.codec.encode(x)
        if text is None and labels is None:
            cond_h, cond_valid = self._unconditional(x.shape[0])
        else:
            cond_h, cond_valid = self._condition(text, text_mask, labels, None)
        h, valid = self._text_first_sequence(cond_h, cond_valid, tokens)
        return tokens, rest, logdet, self._decode(h, valid), cond_h.shape[1]

    @torch.no_grad()
    def score_text(self, images: torch.Tensor, text: torch.Tensor,
                   text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(text | image) in nats per row [B], summed over the valid text tokens (EOS
        included): zero-shot classification scores every class name this way (big_vision
        `score_captions_fn` in `trainers/proj/jetformer/train.py`)."""
        if self.text_head is None:
            raise ValueError("score_text needs a text model (model.conditioning='text')")
        with eval_mode(self):
            text, text_mask = self._text_and_mask(text, text_mask)
            h, valid = self._image_first_sequence(self._encode_clean(images), text, text_mask)
            logits = self._image_first_text_logits(self._decode(h, valid), text.shape[1])
            logp = torch.gather(F.log_softmax(logits, -1), 2, text[..., None]).squeeze(2)  # [B, T]
            return (logp * text_mask).sum(dim=1)

    @torch.no_grad()
    def generate_text(self, images: torch.Tensor, prefix: torch.Tensor | None = None,
                      prefix_mask: torch.Tensor | None = None, max_len: int = 24,
                      use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding of [BOI, img, BOS, prefix, ...] (captioning; VQA with the question as
        `prefix`, ids without EOS). Returns the generated ids long [B, L], L <= max_len, each row
        ending with EOS (then PAD) or cut at max_len. `use_cache=False` recomputes the whole
        sequence every step (reference path for tests)."""
        if self.text_head is None:
            raise ValueError("generate_text needs a text model (model.conditioning='text')")
        if max_len < 1:
            raise ValueError(f"generate_text: max_len must be >= 1, got {max_len}")
        with eval_mode(self):
            h, valid = self._image_first_prefix(self._encode_clean(images))
            B = h.shape[0]
            if prefix is not None:
                prefix = prefix.to(self.device).long()
                pmask = ((prefix != PAD_ID) if prefix_mask is None
                         else prefix_mask.to(self.device).bool())
                h = torch.cat([h, self.text_embed(prefix)], dim=1)
                valid = torch.cat([valid, pmask], dim=1)
            stepper = _Stepper(self, h, valid, max_len - 1, use_cache)
            finished = torch.zeros(B, dtype=torch.bool, device=self.device)
            generated = []
            for i in range(max_len):
                logits = self.text_head(stepper.last_output()).float()        # [B, V]
                logits[:, [PAD_ID, BOS_ID]] = float("-inf")                    # never targets
                nxt = torch.where(finished, PAD_ID, logits.argmax(-1))         # [B]
                generated.append(nxt)
                finished = finished | (nxt == EOS_ID)
                if bool(finished.all()) or i == max_len - 1:
                    break
                stepper.append(self.text_embed(nxt))
            return torch.stack(generated, dim=1)

    # ------------------------------------------------------------------ image sampling
    @torch.no_grad()
    def sample_images(self, text=None, text_mask=None, labels=None, cfg_scale: float = 0.0,
                      temperature: float = 1.0, generator: torch.Generator | None = None,
                      use_cache: bool = True) -> torch.Tensor:
        """Text- or class-conditional samples, uint8 [B, H, W, 3] (JetFormer §3, GIVT §3.3).

        cfg_scale > 0 runs a CFG batch (conditional rows, then [NOLABEL] rows), draws each token
        with GIVT's guided rejection sampler and feeds the same token to both streams;
        cfg_scale = 0 samples the conditional mixture alone. Temperature scales the GMM stds.
        The factored-out dims are drawn from their prior (untempered), then the flow is
        inverted.
        `use_cache=False` recomputes the whole sequence every step (benchmark/test path)."""
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
        with eval_mode(self):
            cond_h, cond_valid = self._condition(text, text_mask, labels, None)
            B = cond_h.shape[0]
            uncond = None
            if cfg_scale > 0:
                T = None if self.conditioning == "class" else cond_h.shape[1]
                uncond = self._text_first_prefix(*self._unconditional(B, T))
            tokens = self._sample_tokens(self._text_first_prefix(cond_h, cond_valid), uncond,
                                         cfg_scale, temperature, generator, use_cache)
            x = self.codec.decode(tokens, generator=generator)                # [B, H, W, 3]
            return from_model_space(x)

    def _sample_tokens(self, cond, uncond, cfg_scale, temperature, generator, use_cache):
        """Ancestral sampling of N soft tokens [B, N, d] after the prefixes `cond` (and the
        unconditional `uncond`, stacked below it as the CFG batch), each `(h [B,P,W], valid)`.

        With `uncond` and cfg_scale = 0 the draw is exactly the unguided one: the [NOLABEL]
        stream is computed but does not touch the conditional rows or the random stream."""
        h, valid = cond
        B = h.shape[0]
        if cfg_scale > 0 and uncond is None:
            raise ValueError("_sample_tokens: cfg_scale > 0 needs the unconditional prefix")
        if uncond is not None:
            hu, vu = uncond
            pad = h.shape[1] - hu.shape[1]           # left-pad the shorter prefix (masked out)
            if pad > 0:
                hu = torch.cat([hu.new_zeros(B, pad, hu.shape[2]), hu], dim=1)
                vu = torch.cat([vu.new_zeros(B, pad), vu], dim=1)
            elif pad < 0:
                h = torch.cat([h.new_zeros(B, -pad, h.shape[2]), h], dim=1)
                valid = torch.cat([valid.new_zeros(B, -pad), valid], dim=1)
            h, valid = torch.cat([h, hu]), torch.cat([valid, vu])             # [2B, P, W]
        N = self.num_image_tokens
        stepper = _Stepper(self, h, valid, N - 1, use_cache)
        tokens = []
        for i in range(N):
            if cfg_scale > 0:  # conditional rows, then [NOLABEL] rows
                gmm = self.gmm_head(stepper.last_output())                     # [R,K], [R,K,d] x2
                cond_gmm, uncond_gmm = zip(*(t.split(B) for t in gmm))
                x = gmm_cfg_sample(cond_gmm, uncond_gmm, cfg_scale, temperature, generator)
            else:  # = gmm_sample(*self.gmm_head(out[:B]), ...), fewer ops
                x = self.gmm_head.sample(stepper.last_output()[:B], temperature, generator)
            tokens.append(x)                                                   # [B, d]
            if i < N - 1:  # both streams are fed the same token
                emb = self.image_embed(x.to(h.dtype))                          # [B, W]
                stepper.append(emb if uncond is None else torch.cat([emb, emb]))
        return torch.stack(tokens, dim=1).to(self.image_embed.weight.dtype)    # [B, N, d]


class _Stepper:
    """Autoregressive decoding state: prefill a prefix, then append one token per step.

    With `use_cache` the prefix is run once into a KV cache and each step runs one token;
    without it the whole sequence is recomputed every step (reference path, O(L^2))."""

    def __init__(self, model: JetFormer, h, valid, num_steps: int, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.h, self.valid = h, valid                                          # [R, P, W], [R, P]
        self.next_pos = valid.long().sum(dim=1)                                # [R]
        self.cache = None
        if use_cache:
            self.cache = model.decoder.init_cache(h.shape[0], h.shape[1] + num_steps)
            out = model._decode(h, valid, self.cache)                         # prefill
        else:
            out = model._decode(h, valid)
        # the prefix may end in padding (e.g. a right-padded VQA question): read the output at
        # each row's last real token
        last = valid.shape[1] - 1 - valid.flip(1).long().argmax(dim=1)         # [R]
        self.out = out[torch.arange(out.shape[0], device=out.device), last]

    def last_output(self) -> torch.Tensor:
        """Decoder output at the last position, [R, W]: predicts the next token."""
        return self.out

    def append(self, emb: torch.Tensor) -> None:
        """Feed the embedding [R, W] of the next token (always a real token)."""
        emb = emb[:, None]                                                     # [R, 1, W]
        if self.use_cache:  # default attn_mask: the token is real
            self.out = self.model.decoder(emb, self.next_pos[:, None], cache=self.cache)[0][:, -1]
        else:
            ones = torch.ones(emb.shape[0], 1, dtype=torch.bool, device=emb.device)
            self.h = torch.cat([self.h, emb], dim=1)
            self.valid = torch.cat([self.valid, ones], dim=1)
            self.out = self.model._decode(self.h, self.valid)[:, -1]
        self.next_pos = self.next_pos + 1
