"""Gemma-v1 style decoder-only transformer with a preallocated KV cache (JetFormer §3, App. A).

Block (pre-norm):  x += drop(Attn(RMSNorm(x)));  x += drop(GeGLU(RMSNorm(x)));  final RMSNorm.
- RMSNorm scales by (1 + scale), scale zero-initialised.
- Multi-query attention: `num_heads` query heads share ONE key/value head; RoPE on q and k at
  explicit integer positions (the caller may use positions = cumsum(valid) − 1); q·head_dim^-0.5.
- GeGLU MLP: W_down(gelu_tanh(W_gate x) ⊙ W_up x).
- Causal attention plus an optional key-padding mask; every token may always attend to itself, so
  padding positions never produce NaNs (and are never attended to by real tokens).

Decoding: `cache = decoder.init_cache(B, max_len)`, then `forward(prefix, positions, cache)` once
(prefill) and `forward(token [B,1,W], position [B,1], cache)` per step; the result equals the full
forward pass over the concatenated sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

_TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def init_linear(layer: nn.Linear) -> None:
    """Truncated normal, variance 1/fan_in (big_vision's Gemma `variance_scaling(1, fan_in)`)."""
    std = (1.0 / layer.in_features) ** 0.5 / _TRUNC_STD
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · (1 + scale), scale zero-initialised (Gemma)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, 1 + self.scale.float(), self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm.forward with its weight 1 + scale given (fp32 maths, result in x's dtype)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def rope_sin_cos(positions: torch.Tensor, head_dim: int, base: float):
    """Rotation angles pos / base^(2i/hd), i < hd/2: positions [B, L] -> (sin, cos) [B, 1, L, hd/2] fp32."""
    exponents = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32) * (2.0 / head_dim)
    angles = positions.float()[:, None, :, None] * base ** -exponents        # [B, 1, L, hd/2]
    return torch.sin(angles), torch.cos(angles)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Gemma's half-split form: pairs (x_i, x_{i+hd/2}) rotated by the angles.
    x [B, H, L, hd], sin/cos [B, 1, L, hd/2] -> [B, H, L, hd]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor):
    """The same rotation as `rope_sin_cos` + `apply_rope`, laid out for `rotate` (computed once per
    forward, shared by q, k and all layers): positions [...], inv_freq [hd] (= base^(-2i/hd) for
    both halves) -> (cos, signed_sin) [..., hd] fp32 with signed_sin = (-sin, sin)."""
    angles = positions.float()[..., None] * inv_freq                        # [..., hd]
    signed_sin = angles.sin()
    signed_sin[..., :inv_freq.shape[0] // 2].neg_()
    return angles.cos(), signed_sin


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype) without the dispatch when it already has it (per-op overhead, decoding)."""
    return x if x.dtype == dtype else x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x·cos + swap_halves(x)·(-sin, sin) = [x1·cos - x2·sin, x2·cos + x1·sin], bit for bit the
    result of `apply_rope` with 4 ops instead of 8. x [..., hd], tables broadcastable to it."""
    xf = _cast(x, torch.float32)
    return _cast(xf * cos + xf.roll(x.shape[-1] // 2, -1) * signed_sin, x.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values of every layer (one shared head: MQA) plus which slots hold real tokens.

    kv: [depth, B, max_len, 2, head_dim] (key, value of a slot side by side: the one-token step
    writes both with one copy); k, v: its [depth, B, max_len, head_dim] views; valid: bool
    [B, max_len]; length: slots filled so far; step_weights: weights derived for the one-token step
    (set on first use: a cache only holds for the weights that filled it); step_bias: additive
    attention bias [B, 1, max_len] of the one-token steps (0 = may attend, -inf = padding),
    derived from `valid` on first use and kept up to date by the steps.
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


class MultiQueryAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(width, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, head_dim, bias=False)   # ONE key head shared by all queries
        self.v_proj = nn.Linear(width, head_dim, bias=False)   # ONE value head
        self.o_proj = nn.Linear(num_heads * head_dim, width, bias=False)

    def forward(self, x, rope, mask, layer_cache=None, start=0):
        """x [B, L, W]; rope = `rope_tables` of the positions; mask bool [B, 1, L, S] (True = may
        attend); layer_cache = (k, v) views [B, max_len, hd], written at slots [start, start + L).
        Returns [B, L, W]."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(x).unsqueeze(1)                                               # [B, 1, L, hd]
        v = self.v_proj(x).unsqueeze(1)                                               # [B, 1, L, hd]
        q, k = rotate(q, *rope), rotate(k, *rope)
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            k_cache[:, start:start + L] = k[:, 0]
            v_cache[:, start:start + L] = v[:, 0]
            k = k_cache[:, None, :start + L].to(q.dtype)                              # [B, 1, S, hd]
            v = v_cache[:, None, :start + L].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             scale=self.head_dim ** -0.5,
                                             enable_gqa=True)                         # [B, H, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


class GeGLU(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.gate = nn.Linear(width, mlp_dim, bias=False)
        self.up = nn.Linear(width, mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Block(nn.Module):
    def __init__(self, width, num_heads, head_dim, mlp_dim, dropout):
        super().__init__()
        self.pre_attention_norm = RMSNorm(width)
        self.attn = MultiQueryAttention(width, num_heads, head_dim)
        self.pre_ffw_norm = RMSNorm(width)
        self.mlp = GeGLU(width, mlp_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, mask, layer_cache=None, start=0):
        x = x + self.drop(self.attn(self.pre_attention_norm(x), rope, mask, layer_cache, start))
        return x + self.drop(self.mlp(self.pre_ffw_norm(x)))


class Decoder(nn.Module):
    """Causal Gemma-style stack: forward(h [B, L, W], positions [B, L]) -> (out [B, L, W], cache)."""

    def __init__(self, width: int, depth: int, num_heads: int, head_dim: int, mlp_dim: int,
                 dropout: float = 0.0, rope_base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if min(width, depth, num_heads, head_dim, mlp_dim) <= 0:
            raise ValueError(f"Decoder sizes must be positive: width={width}, depth={depth}, "
                             f"num_heads={num_heads}, head_dim={head_dim}, mlp_dim={mlp_dim}")
        self.width, self.depth, self.head_dim, self.rope_base = width, depth, head_dim, rope_base
        self.num_heads = num_heads
        self.blocks = nn.ModuleList(Block(width, num_heads, head_dim, mlp_dim, dropout)
                                    for _ in range(depth))
        self.final_norm = RMSNorm(width)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m)
        self._inv_freq = {}                     # device -> RoPE frequencies [hd] (not state)

    def inv_freq(self, device) -> torch.Tensor:
        """RoPE frequencies base^(-2i/hd) for both halves, [hd] fp32 (cached per device)."""
        device = torch.device(device)
        if device not in self._inv_freq:
            half = torch.arange(self.head_dim // 2, device=device, dtype=torch.float32)
            inv = self.rope_base ** -(half * (2.0 / self.head_dim))   # as in rope_sin_cos
            self._inv_freq[device] = torch.cat([inv, inv])
        return self._inv_freq[device]

    def init_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `max_len` tokens (prefix + everything to be generated)."""
        p = self.final_norm.scale
        dtype = dtype or p.dtype
        shape = (self.depth, batch_size, max_len, 2, self.head_dim)
        return KVCache(kv=torch.zeros(shape, dtype=dtype, device=p.device),
                       valid=torch.zeros(batch_size, max_len, dtype=torch.bool, device=p.device))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None):
        """h [B, L, W]; positions long [B, L] (RoPE); attn_mask bool [B, L] = which of these L
        tokens are real (keys of padding tokens are masked out; default all real).

        With a cache, the L tokens are appended at slots [cache.length, cache.length + L) and attend
        to every real token already cached plus the causal part of themselves; `cache.length`
        advances by L. Returns (out [B, L, W] after the final RMSNorm, cache)."""
        B, L, _ = h.shape
        if positions.shape != (B, L):
            raise ValueError(f"positions must have shape {(B, L)}, got {tuple(positions.shape)}")
        if attn_mask is not None:
            attn_mask = attn_mask.to(device=h.device, dtype=torch.bool)
            if attn_mask.shape != (B, L):
                raise ValueError(f"attn_mask must have shape {(B, L)}, got "
                                 f"{tuple(attn_mask.shape)}")
        valid = (torch.ones(B, L, dtype=torch.bool, device=h.device) if attn_mask is None
                 else attn_mask)

        start = 0
        if cache is not None:
            start = cache.length
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch {cache.batch_size}, input has batch {B}")
            if start + L > cache.max_len:
                raise ValueError(f"KV cache overflow: {start} + {L} tokens > max_len {cache.max_len}")
            if L == 1 and not self.training:
                out = self._step(h.reshape(B, -1), positions, cache, attn_mask)
                return out.view(B, 1, -1), cache
            cache.valid[:, start:start + L] = valid
            cache.step_bias = None              # re-derived from `valid` by the next step
            key_valid = cache.valid[:, :start + L]                                  # [B, S]
        else:
            key_valid = valid
        S = start + L
        query_slot = torch.arange(start, S, device=h.device)[:, None]              # [L, 1]
        key_slot = torch.arange(S, device=h.device)[None, :]                       # [1, S]
        causal = key_slot <= query_slot                                             # [L, S]
        mask = causal & (key_valid[:, None, :] | (key_slot == query_slot))         # [B, L, S]
        mask = mask[:, None]                                                        # [B, 1, L, S]

        rope = rope_tables(positions[:, None], self.inv_freq(h.device))           # [B, 1, L, hd] x2
        x = h
        k_cache, v_cache = (None, None) if cache is None else (cache.k, cache.v)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (k_cache[i], v_cache[i])
            x = block(x, rope, mask, layer_cache, start)
        if cache is not None:
            cache.length = S
        return self.final_norm(x), cache

    def _step_weights(self):
        """Per-layer weights of the one-token step, derived once per cache: the fused projections
        [q; k; v] and [gate; up] (one matmul each instead of three and two), with the preceding
        RMSNorm's weight folded into their input columns:
            RMSNorm(x) @ Wᵀ = rsqrt(Σx² + W·eps) · (x @ (W · √W·(1 + scale))ᵀ),
        and the transposed output projections for addmm (residual add in the same op). Each eps
        is kept as the tensor √(W·eps): sqrt(Σx² + W·eps) = hypot(‖x‖, √(W·eps)), two ops (fewer
        than `rms_norm`'s on the CPU). The RoPE frequencies of the [q_1..q_H, k, v] rows carry
        the sign of `rotate`'s (-sin, sin) (sin is odd, cos even: cos(±a) = cos a, sin(±a) =
        ±sin a); v gets angle 0."""
        def root_eps(norm):
            return torch.tensor((norm.eps * self.width) ** 0.5, device=norm.scale.device)

        def fold(norm, weight):
            return root_eps(norm), weight * ((1 + norm.scale) * self.width ** 0.5)

        layers = []
        for blk in self.blocks:
            at, mlp = blk.attn, blk.mlp
            layers.append((*fold(blk.pre_attention_norm, torch.cat(
                               [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])),
                           at.o_proj.weight.t(),
                           *fold(blk.pre_ffw_norm, torch.cat([mlp.gate.weight, mlp.up.weight])),
                           mlp.down.weight.t()))
        final = self.final_norm
        inv_freq = self.inv_freq(final.scale.device)
        signed = inv_freq.clone()
        signed[:self.head_dim // 2].neg_()                                          # (-, +)
        signed = torch.cat([signed.expand(self.num_heads + 1, -1),
                            torch.zeros_like(signed)[None]])                        # [H+2, hd]
        return layers, root_eps(final), (1 + final.scale) * self.width ** 0.5, signed

    @staticmethod
    def _rms_denominator(x, root_eps):
        """sqrt(Σx² + W·eps) over the last dim in fp32, [B, 1] (= √W / RMSNorm's factor)."""
        return torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32),
                           root_eps)

    @staticmethod
    def _init_step_bias(cache: KVCache, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, max_len] additive bias from `cache.valid` over the filled slots; slots not yet
        filled are 0 (a step's own token always counts; a padding step masks itself after)."""
        bias = torch.zeros(cache.batch_size, 1, cache.max_len, dtype=dtype,
                           device=cache.valid.device)
        n = cache.length
        bias[:, 0, :n].masked_fill_(~cache.valid[:, :n], float("-inf"))
        return bias

    def _step(self, h, positions, cache, attn_mask):
        """Decoding step of one token per row in eval mode (dropout off): h [B, W], positions
        [B, 1], attn_mask bool [B, 1] or None (real) -> [B, W]. The maths of the general path
        with L = 1, written for per-op overhead (it dominates at small sizes): folded weights
        (`_step_weights`), the token attends to the real cached tokens
        and to itself through the cache's additive key bias (no [L, S] mask), one rotation of
        the [q; k; v] rows (v by angle 0), one cache write for k and v, and with one query
        position the H heads are the rows of one [H, hd] x [hd, S] product per example (MQA:
        one shared key head), so two small bmm replace SDPA."""
        if cache.step_weights is None:  # + per-layer views of the cache, [B, max_len, 2, hd]
            cache.step_weights = (*self._step_weights(), [cache.kv[i] for i in range(self.depth)])
        layers, final_eps, final_weight, signed_freq, layer_kv = cache.step_weights
        B, H, hd = h.shape[0], self.num_heads, self.head_dim
        slot = cache.length
        if cache.step_bias is None:
            cache.step_bias = self._init_step_bias(cache, layers[0][1].dtype)
        bias = cache.step_bias.narrow(2, 0, slot + 1)                              # [B, 1, S]
        angles = positions.float()[:, :, None] * signed_freq                       # [B, H+2, hd]
        cos, signed_sin = angles.cos(), angles.sin()
        x = h
        for i, (eps1, w_qkv, w_o_t, eps2, w_gate_up, w_down_t) in enumerate(layers):
            qkv = F.linear(x, w_qkv).div_(self._rms_denominator(x, eps1)).view(B, H + 2, hd)
            qf = _cast(qkv, torch.float32)                   # `rotate`, with one fused mul-add
            qkv = _cast(torch.addcmul(qf * cos, qf.roll(hd // 2, -1), signed_sin), qkv.dtype)
            layer_kv[i].select(1, slot).copy_(qkv.narrow(1, H, 2))
            keys, values = _cast(layer_kv[i].narrow(1, 0, slot + 1), qkv.dtype).unbind(2)
            logits = torch.baddbmm(_cast(bias, qkv.dtype), qkv.narrow(1, 0, H),
                                   keys.transpose(1, 2), alpha=hd ** -0.5)          # [B, H, S]
            out = torch.bmm(logits.softmax(-1), values).view(B, H * hd)
            # residual add inside the matmul (addmm) unless autocast gives out another dtype
            x = torch.addmm(x, out, w_o_t) if x.dtype == out.dtype else x + out @ w_o_t
            gate, up = F.linear(x, w_gate_up).div_(self._rms_denominator(x, eps2)).chunk(2, dim=-1)
            hidden = F.gelu(gate, approximate="tanh") * up
            x = torch.addmm(x, hidden, w_down_t) if x.dtype == hidden.dtype else x + hidden @ w_down_t
        if attn_mask is None:
            cache.valid[:, slot] = True
        else:  # a padding token attended to itself; later tokens must not attend to it
            cache.valid[:, slot] = attn_mask[:, 0]
            cache.step_bias[:, 0, slot].masked_fill_(~attn_mask[:, 0], float("-inf"))
        cache.length = slot + 1
        x_normed = _cast(x, torch.float32) / self._rms_denominator(x, final_eps)
        return _cast(x_normed.mul_(final_weight), x.dtype)
