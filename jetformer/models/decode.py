"""KV cache and the fast one-token decoding step of `transformer.Decoder` (JetFormer §3, App. A).

`transformer.py` holds the one reference implementation of the Gemma block; this module holds
the same maths for L = 1 in eval mode, rewritten for per-op overhead (it dominates decoding at
small sizes). `Decoder.forward` dispatches here for one-token steps on a cache; the tests in
`tests/test_transformer.py` pin `step` to the reference path (full pass == cached steps).

What the rewrite changes (not the maths):
- the [q; k; v] and [gate; up] projections are one matmul each, with the preceding RMSNorm's
  weight folded into their input columns:
      RMSNorm(x) @ Wᵀ = (x @ (W · √D·(1 + scale))ᵀ) / sqrt(Σx² + D·eps),   D = width;
- sqrt(Σx² + D·eps) = hypot(‖x‖, √(D·eps)): two ops instead of `rms_norm`'s;
- RoPE is one rotation of the [q_1..q_H, k, v] rows (v by angle 0), the sign of the half-split
  rotation carried by the frequencies (sin is odd, cos even);
- the token attends to the real cached tokens and to itself through an additive key bias kept
  on the cache (no [L, S] mask); with one query and one shared key head (MQA) the H heads are
  the rows of one [H, hd] x [hd, S] product per example, so two small bmm replace SDPA;
- the residual adds ride inside the output matmuls (addmm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype) without the dispatch when it already has it (per-op overhead)."""
    return x if x.dtype == dtype else x.to(dtype)


@dataclass
class KVCache:
    """Preallocated keys/values of every layer (one shared head: MQA) plus which slots are real.

    kv: [depth, B, max_len, 2, head_dim] (key, value of a slot side by side: the one-token step
    writes both with one copy); k, v: its [depth, B, max_len, head_dim] views; valid: bool
    [B, max_len]; length: slots filled so far; step_weights: `step_weights` of the decoder
    (set on first use: a cache only holds for the weights that filled it) plus per-layer views
    of `kv`; step_bias: additive attention bias [B, 1, max_len] of the one-token steps
    (0 = may attend, -inf = padding), derived from `valid` on first use and kept up to date.
    """
    kv: torch.Tensor
    valid: torch.Tensor
    length: int = 0
    step_weights: tuple | None = None
    step_bias: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor:
        return self.kv[..., 0, :]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[..., 1, :]

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]


def step_weights(decoder):
    """Per-layer weights of the one-token step: (eps₁, W_qkv, W_oᵀ, eps₂, W_gate_up, W_downᵀ)
    with the norms folded in (module docstring), each eps kept as the tensor √(D·eps); then the
    final norm's √(D·eps) and weight √D·(1 + scale), and the signed RoPE frequencies [H+2, hd]
    of the [q_1..q_H, k, v] rows (v: 0)."""
    width = decoder.width

    def root_eps(norm):
        return torch.tensor((norm.eps * width) ** 0.5, device=norm.scale.device)

    def fold(norm, weight):
        return root_eps(norm), weight * ((1 + norm.scale) * width ** 0.5)

    layers = []
    for blk in decoder.blocks:
        at, mlp = blk.attn, blk.mlp
        layers.append((*fold(blk.pre_attention_norm, torch.cat(
                           [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])),
                       at.o_proj.weight.t(),
                       *fold(blk.pre_ffw_norm, torch.cat([mlp.gate.weight, mlp.up.weight])),
                       mlp.down.weight.t()))
    final = decoder.final_norm
    signed = decoder.inv_freq(final.scale.device).clone()
    signed[:decoder.head_dim // 2].neg_()                                       # (-, +)
    signed = torch.cat([signed.expand(decoder.num_heads + 1, -1),
                        torch.zeros_like(signed)[None]])                        # [H+2, hd]
    return layers, root_eps(final), (1 + final.scale) * width ** 0.5, signed


def rms_denominator(x: torch.Tensor, root_eps: torch.Tensor) -> torch.Tensor:
    """sqrt(Σx² + D·eps) over the last dim in fp32, [B, 1] (= √D / RMSNorm's factor)."""
    return torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32),
                       root_eps)


def init_step_bias(cache: KVCache, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, max_len] additive bias from `cache.valid` over the filled slots; slots not yet
    filled are 0 (a step's own token always counts; a padding step masks itself after)."""
    bias = torch.zeros(cache.batch_size, 1, cache.max_len, dtype=dtype,
                       device=cache.valid.device)
    n = cache.length
    bias[:, 0, :n].masked_fill_(~cache.valid[:, :n], float("-inf"))
    return bias


def step(decoder, h, positions, cache: KVCache, attn_mask=None):
    """One token per row through `decoder` in eval mode (dropout off): h [B, W], positions
    [B, 1], attn_mask bool [B, 1] or None (real) -> output after the final norm, [B, W]. The
    token is written at slot `cache.length`, which advances by one."""
    if cache.step_weights is None:
        layer_kv = [cache.kv[i] for i in range(decoder.depth)]                 # [B, max_len, 2, hd]
        cache.step_weights = (*step_weights(decoder), layer_kv)
    layers, final_eps, final_weight, signed_freq, layer_kv = cache.step_weights
    B, H, hd = h.shape[0], decoder.num_heads, decoder.head_dim
    slot = cache.length
    if cache.step_bias is None:
        cache.step_bias = init_step_bias(cache, layers[0][1].dtype)
    bias = cache.step_bias.narrow(2, 0, slot + 1)                              # [B, 1, S]
    angles = positions.float()[:, :, None] * signed_freq                       # [B, H+2, hd]
    cos, signed_sin = angles.cos(), angles.sin()
    x = h
    for i, (eps1, w_qkv, w_o_t, eps2, w_gate_up, w_down_t) in enumerate(layers):
        qkv = F.linear(x, w_qkv).div_(rms_denominator(x, eps1)).view(B, H + 2, hd)
        qf = cast(qkv, torch.float32)                       # rotation with one fused mul-add
        qkv = cast(torch.addcmul(qf * cos, qf.roll(hd // 2, -1), signed_sin), qkv.dtype)
        layer_kv[i].select(1, slot).copy_(qkv.narrow(1, H, 2))
        keys, values = cast(layer_kv[i].narrow(1, 0, slot + 1), qkv.dtype).unbind(2)
        logits = torch.baddbmm(cast(bias, qkv.dtype), qkv.narrow(1, 0, H),
                               keys.transpose(1, 2), alpha=hd ** -0.5)          # [B, H, S]
        out = torch.bmm(logits.softmax(-1), values).view(B, H * hd)
        # residual add inside the matmul (addmm) unless autocast gives out another dtype
        x = torch.addmm(x, out, w_o_t) if x.dtype == out.dtype else x + out @ w_o_t
        gate, up = F.linear(x, w_gate_up).div_(rms_denominator(x, eps2)).chunk(2, dim=-1)
        hidden = F.gelu(gate, approximate="tanh") * up
        x = torch.addmm(x, hidden, w_down_t) if x.dtype == hidden.dtype else x + hidden @ w_down_t
    if attn_mask is None:
        cache.valid[:, slot] = True
    else:  # a padding token attended to itself; later tokens must not attend to it
        cache.valid[:, slot] = attn_mask[:, 0]
        cache.step_bias[:, 0, slot].masked_fill_(~attn_mask[:, 0], float("-inf"))
    cache.length = slot + 1
    x_normed = cast(x, torch.float32) / rms_denominator(x, final_eps)
    return cast(x_normed.mul_(final_weight), x.dtype)
