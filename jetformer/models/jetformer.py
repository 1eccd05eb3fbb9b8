"""JetFormer: one decoder-only transformer over text tokens and flow-encoded soft image tokens
(paper §3-4; official-code facts items 8-12, 16-22).

Sequences (teacher forcing: the input is the sequence without its last token, the target the
sequence without its first):

  class-conditional   [BOS, c_1 .. c_C, BOI, img_1 .. img_N]     (C = num_class_tokens)
  text first (T2I)    [BOS, t_1 .. t_T, BOI, img_1 .. img_N]
  image first (I2T)   [BOI, img_1 .. img_N, BOS, t_1 .. t_T]

Only the second modality is scored: image bits/dim for text-first rows, `text_loss_weight` x
text NLL (nats per token) for image-first rows. Text padding is masked out of attention and
RoPE positions are `cumsum(valid) - 1`, so a padded row computes exactly what the unpadded row
would. Text ids come from the tokenizer (pad 0, unk 1, bos 2, eos 3); the text embedding table
has two extra rows, [BOI] = vocab_size and [NOLABEL] = vocab_size + 1. A class label is embedded
by C separate tables (row `num_classes` of each is its [NOLABEL]).

Image NLL (paper eq. 1, facts item 8), every one of the H*W*3 dimensions scored exactly once:
  bpd = (NLL_gmm(tokens) + NLL_prior(rest) - logdet) / (H*W*3) / ln 2 + log2(127.5)
(the prior of `rest`: `ImageCodec.prior_nll`, N(0, I) or a learnt diagonal Gaussian)
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetformer.noise import bits_per_dim, curriculum_noise, from_model_space, to_model_space

from .factoring import ImageCodec, standard_normal_nll
from .gmm import GMMHead, gmm_cfg_sample, gmm_nll
from .transformer import Decoder, init_linear

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


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
    """Flow (`codec`) + Gemma decoder + GMM image head + softmax text head (paper Fig. 1)."""

    def __init__(self, cfg, vocab_size: int, num_classes: int = 0, pca: dict | None = None):
        super().__init__()
        m = cfg.model
        if vocab_size <= EOS_ID:
            raise ValueError(f"JetFormer: vocab_size must be > {EOS_ID} (pad 0, unk 1, bos 2, "
                             f"eos 3 are reserved), got {vocab_size}")
        self.cfg = cfg
        self.conditioning = m.conditioning
        self.codec = ImageCodec(cfg, pca)
        self.num_image_tokens = cfg.num_image_tokens                 # N
        self.factored_dims = self.codec.factored_dims                # d
        self.num_image_dims = 3 * cfg.data.resolution ** 2           # H*W*3, denominator of bpd
        width = m.decoder.width

        self.vocab_size = vocab_size
        self.boi_id, self.nolabel_id = vocab_size, vocab_size + 1
        # N(0, 1) init, no sqrt(width) scaling (facts item 12)
        self.text_embed = nn.Embedding(vocab_size + 2, width)
        nn.init.normal_(self.text_embed.weight, std=1.0)

        self.num_classes = 0
        self.num_class_tokens = m.num_class_tokens
        if self.conditioning == "class":
            self.num_classes = num_classes or m.num_classes
            if self.num_classes <= 0:
                raise ValueError("JetFormer: model.conditioning='class' needs the number of classes "
                                 "(model.num_classes or the num_classes argument), got 0")
            # C tables of (num_classes + 1) rows each; row num_classes = [NOLABEL] (facts item 11)
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

    # ------------------------------------------------------------------ embeddings / layouts
    @property
    def device(self) -> torch.device:
        return self.text_embed.weight.device

    def _special(self, token_id: int, batch: int) -> torch.Tensor:
        """Embedding of one special token, [B, 1, W]."""
        return self.text_embed.weight[token_id].view(1, 1, -1).expand(batch, 1, -1)

    def _condition(self, text, text_mask, labels, drop):
        """The prefix condition: class tokens [B, C, W] or text [B, T, W], plus validity [B, .].

        drop bool [B] (or None) replaces the condition by [NOLABEL] (CFG, facts item 16): all C
        tables' [NOLABEL] rows, or T [NOLABEL] text tokens that are all valid (official code)."""
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
        text = text.to(self.device).long()
        text_mask = (text != PAD_ID) if text_mask is None else text_mask.to(self.device).bool()
        if text.ndim != 2 or text_mask.shape != text.shape:
            raise ValueError(f"text must be long [B, T] with a bool text_mask of the same shape, "
                             f"got {tuple(text.shape)} and {tuple(text_mask.shape)}")
        h = self.text_embed(text)                                              # [B, T, W]
        if drop is not None:
            nolabel = self._special(self.nolabel_id, text.shape[0])
            h = torch.where(drop[:, None, None], nolabel, h)
            text_mask = text_mask | drop[:, None]
        return h, text_mask

    def _unconditional(self, batch: int, text_len: int | None = None):
        """The [NOLABEL] condition for `batch` rows (CFG's unconditional stream)."""
        drop = torch.ones(batch, dtype=torch.bool, device=self.device)
        if self.conditioning == "class":
            labels = torch.zeros(batch, dtype=torch.long, device=self.device)
            return self._condition(None, None, labels, drop)
        T = text_len or self.cfg.tokenizer.max_text_len
        text = torch.full((batch, T), PAD_ID, dtype=torch.long, device=self.device)
        return self._condition(text, None, None, drop)

    def _text_first_prefix(self, cond_h, cond_valid):
        """[BOS, condition, BOI] -> (h [B, T+2, W], valid [B, T+2])."""
        B = cond_h.shape[0]
        h = torch.cat([self._special(BOS_ID, B), cond_h, self._special(self.boi_id, B)], dim=1)
        ones = torch.ones(B, 1, dtype=torch.bool, device=cond_valid.device)
        return h, torch.cat([ones, cond_valid, ones], dim=1)

    def _image_first_prefix(self, tokens):
        """[BOI, img_1..img_N, BOS] -> (h [B, N+2, W], valid [B, N+2])."""
        B, N, _ = tokens.shape
        h = torch.cat([self._special(self.boi_id, B), self.image_embed(tokens),
                       self._special(BOS_ID, B)], dim=1)
        return h, torch.ones(B, N + 2, dtype=torch.bool, device=h.device)

    def _decode(self, h, valid, cache=None):
        return self.decoder(h, _positions(valid), cache=cache, attn_mask=valid)[0]

    # ------------------------------------------------------------------ image <-> tokens
    def _encode_clean(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> soft tokens [B, N, d] for use as a prefix (captioning, scoring): no
        curriculum noise, and the dequantisation noise replaced by its mean (deterministic)."""
        x = to_model_space(images.to(self.device), dequantize=False) + 0.5 / 127.5
        return self.codec.encode(x)[0]

    def _text_first_image_nll(self, out, tokens, rest, logdet, cond_len):
        """Image NLL (nats) per row from the decoder output of a text-first sequence."""
        N = self.num_image_tokens
        img_out = out[:, cond_len + 1: cond_len + 1 + N]                      # [B, N, W]: BOI..img_{N-1}
        logits, means, scales = self.gmm_head(img_out)                         # [B,N,K], [B,N,K,d] x2
        nll_gmm = gmm_nll(logits, means, scales, tokens).sum(dim=1)           # [B]
        nll_rest = self.codec.prior_nll(rest)                                  # [B]
        return nll_gmm, nll_rest, nll_gmm + nll_rest - logdet

    def _image_first_text_logits(self, out, text_len):
        """Text logits [B, T, V] from the decoder output of an image-first sequence."""
        N = self.num_image_tokens
        return self.text_head(out[:, N + 1: N + 1 + text_len]).float()        # BOS..t_{T-1}

    # ------------------------------------------------------------------ training loss
    def _draw_image_first(self, batch: dict, B: int, generator) -> torch.Tensor:
        if self.conditioning == "class":
            if batch.get("image_first") is not None and bool(torch.as_tensor(batch["image_first"]).any()):
                raise ValueError("batch['image_first']: a class-conditional model has no "
                                 "image-first rows")
            return torch.zeros(B, dtype=torch.bool, device=self.device)
        if batch.get("image_first") is not None:
            image_first = torch.as_tensor(batch["image_first"]).to(self.device).bool()
            if image_first.shape != (B,):
                raise ValueError(f"batch['image_first'] must be bool [{B}], got shape "
                                 f"{tuple(image_first.shape)}")
            return image_first
        task = self.cfg.train.task
        if task == "t2i":
            return torch.zeros(B, dtype=torch.bool, device=self.device)
        if task == "i2t":
            return torch.ones(B, dtype=torch.bool, device=self.device)
        if task == "both":  # 50/50 per example (facts item 10)
            return torch.rand(B, generator=generator, device=self.device) < 0.5
        raise ValueError(f"train.task={task!r} does not fit a text-conditional model")

    def compute_loss(self, batch: dict, sigma_rgb: float, train: bool = True,
                     generator: torch.Generator | None = None) -> dict:
        """Per-row loss on the second modality, averaged over the batch (facts item 8).

        batch: `images` uint8 [B,H,W,3]; `text` long [B,T] + `text_mask` bool [B,T] (text models);
        `labels` long [B] (class models); optional `image_first` bool [B] and `text_loss_mask`
        bool [B,T]. `train` enables the RGB curriculum noise (sigma_rgb, pixel units, text-first
        rows only), the latent noise and the [NOLABEL] condition dropout; dequantisation is
        always on. Dropout follows the module's train()/eval() mode. Returns `loss` (with grad)
        and detached metrics: `image_bpd`, `text_nll` (nats/token), `logdet_per_dim` and
        `prior_nll_per_dim` (bits per image dim, over text-first rows; NaN when a batch has no row
        of that kind). The flow's log-det per dim is capped at num_couplings/2 bits.
        """
        images = batch.get("images")
        if images is None or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("batch['images'] must be uint8 [B, H, W, 3], got "
                             f"{None if images is None else (images.dtype, tuple(images.shape))}")
        images = images.to(self.device)
        B = images.shape[0]
        m, t = self.cfg.model, self.cfg.train
        image_first = self._draw_image_first(batch, B, generator)
        tf = (~image_first).nonzero().squeeze(1)                               # text-first rows
        imf = image_first.nonzero().squeeze(1)                                 # image-first rows
        text = batch.get("text")
        text_mask = batch.get("text_mask")
        if self.conditioning == "text":
            if text is None:
                raise ValueError("batch['text'] (long [B, T]) is required by a text model")
            text = text.to(self.device).long()
            text_mask = (text != PAD_ID) if text_mask is None else text_mask.to(self.device).bool()
        labels = batch.get("labels")

        hs, valids, parts = [], [], {}
        # --- text-first rows: the image is the second modality and is scored
        if len(tf):
            pixels = images[tf]
            if train and sigma_rgb > 0:
                pixels = curriculum_noise(pixels, float(sigma_rgb), generator)
            x = to_model_space(pixels, generator, dequantize=True)
            tokens, rest, logdet = self.codec.encode(x)                        # [b,N,d] [b,N,D-d] [b]
            if train and m.latent_noise_max > 0:  # same noisy tokens: AR input AND target (item 9)
                std = m.latent_noise_max * torch.rand(len(tf), generator=generator,
                                                      device=self.device)
                noise = torch.randn(tokens.shape, generator=generator, device=self.device)
                tokens = tokens + std[:, None, None] * noise.to(tokens.dtype)
            drop = None
            if train and t.cfg_drop_prob > 0:
                drop = torch.rand(len(tf), generator=generator, device=self.device) < t.cfg_drop_prob
            cond_h, cond_valid = self._condition(
                None if text is None else text[tf], None if text_mask is None else text_mask[tf],
                None if labels is None else labels.to(self.device)[tf], drop)
            h, valid = self._text_first_prefix(cond_h, cond_valid)
            hs.append(torch.cat([h, self.image_embed(tokens[:, :-1])], dim=1))
            valids.append(torch.cat([valid, valid.new_ones(len(tf), tokens.shape[1] - 1)], dim=1))
            parts["tf"] = (tokens, rest, logdet, cond_h.shape[1])
        # --- image-first rows: the flow only encodes the prefix (stop-gradient, facts item 10)
        if len(imf):
            with torch.no_grad():
                tokens = self.codec.encode(to_model_space(images[imf], generator))[0]
            h, valid = self._image_first_prefix(tokens)
            txt = text[imf]
            hs.append(torch.cat([h, self.text_embed(txt[:, :-1])], dim=1))
            valids.append(torch.cat([valid, text_mask[imf][:, :-1]], dim=1))
            target_mask = text_mask[imf]
            if batch.get("text_loss_mask") is not None:
                target_mask = target_mask & batch["text_loss_mask"].to(self.device).bool()[imf]
            parts["if"] = (txt, target_mask)

        if len(hs) == 2 and hs[0].shape[1] != hs[1].shape[1]:
            raise AssertionError("text-first and image-first sequences differ in length")
        out = self._decode(torch.cat(hs), torch.cat(valids))                  # [B, L, W]

        nan = torch.tensor(float("nan"), device=self.device)
        metrics = {"image_bpd": nan, "text_nll": nan, "logdet_per_dim": nan,
                   "prior_nll_per_dim": nan}
        loss_sum = torch.zeros((), device=self.device)
        ln2_dims = math.log(2.0) * self.num_image_dims
        if "tf" in parts:
            tokens, rest, logdet, cond_len = parts["tf"]
            _, nll_rest, nll = self._text_first_image_nll(out[:len(tf)], tokens, rest, logdet,
                                                          cond_len)
            bpd = bits_per_dim(nll, self.num_image_dims)                      # [b]
            loss_sum = loss_sum + bpd.sum()
            metrics.update(image_bpd=bpd.detach().mean(),
                           logdet_per_dim=(logdet.detach() / ln2_dims).mean(),
                           prior_nll_per_dim=(nll_rest.detach() / ln2_dims).mean())
        if "if" in parts:
            txt, target_mask = parts["if"]
            logits = self._image_first_text_logits(out[len(tf):], txt.shape[1])  # [b, T, V]
            nll_tok = F.cross_entropy(logits.transpose(1, 2), txt, reduction="none")  # [b, T]
            w = target_mask.float()
            text_nll = (nll_tok * w).sum(1) / w.sum(1).clamp_min(1.0)         # nats per token
            loss_sum = loss_sum + t.text_loss_weight * text_nll.sum()
            metrics["text_nll"] = text_nll.detach().mean()
        return {"loss": loss_sum / B, **metrics}

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
        B = x.shape[0]
        tokens, rest, logdet = self.codec.encode(x)
        if text is None and labels is None:
            cond_h, cond_valid = self._unconditional(B)
        else:
            cond_h, cond_valid = self._condition(text, text_mask, labels, None)
        h, valid = self._text_first_prefix(cond_h, cond_valid)
        h = torch.cat([h, self.image_embed(tokens[:, :-1])], dim=1)
        valid = torch.cat([valid, valid.new_ones(B, tokens.shape[1] - 1)], dim=1)
        return tokens, rest, logdet, self._decode(h, valid), cond_h.shape[1]

    @torch.no_grad()
    def score_text(self, images: torch.Tensor, text: torch.Tensor,
                   text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(text | image) in nats per row [B], summed over the valid text tokens (EOS
        included): zero-shot classification scores every class name this way (facts item 21)."""
        if self.text_head is None:
            raise ValueError("score_text needs a text model (model.conditioning='text')")
        with eval_mode(self):
            text = text.to(self.device).long()
            text_mask = (text != PAD_ID) if text_mask is None else text_mask.to(self.device).bool()
            h, valid = self._image_first_prefix(self._encode_clean(images))
            h = torch.cat([h, self.text_embed(text[:, :-1])], dim=1)
            valid = torch.cat([valid, text_mask[:, :-1]], dim=1)
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
