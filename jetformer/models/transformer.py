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
forward pass over the concatenated sequence. In eval mode one-token steps run `decode.step`, the
same maths rewritten for per-op overhead (tests pin the two together); this file is the reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetformer.models import decode
from jetformer.models.decode import KVCache

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


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor):
    """RoPE angles pos · base^(-2i/hd), laid out for `rotate` (computed once per forward, shared
    by q, k and all layers): positions [...], inv_freq [hd] (= base^(-2i/hd), i < hd/2, for both
    halves) -> (cos, signed_sin) [..., hd] fp32 with signed_sin = (-sin, sin)."""
    angles = positions.float()[..., None] * inv_freq                        # [..., hd]
    signed_sin = angles.sin()
    signed_sin[..., :inv_freq.shape[0] // 2].neg_()
    return angles.cos(), signed_sin


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Gemma's half-split form: the pairs (x_i, x_{i+hd/2}) rotated by the
    angles, x·cos + swap_halves(x)·(-sin, sin) = [x1·cos - x2·sin, x2·cos + x1·sin] in fp32.
    x [..., hd], tables broadcastable to it; result in x's dtype."""
    xf = decode.cast(x, torch.float32)
    return decode.cast(xf * cos + xf.roll(x.shape[-1] // 2, -1) * signed_sin, x.dtype)


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
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,L,hd]
        k = self.k_proj(x).unsqueeze(1)                                               # [B,1,L,hd]
        v = self.v_proj(x).unsqueeze(1)                                               # [B,1,L,hd]
        q, k = rotate(q, *rope), rotate(k, *rope)
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            k_cache[:, start:start + L] = k[:, 0]
            v_cache[:, start:start + L] = v[:, 0]
            k = k_cache[:, None, :start + L].to(q.dtype)                              # [B,1,S,hd]
            v = v_cache[:, None, :start + L].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             scale=self.head_dim ** -0.5,
                                             enable_gqa=True)                         # [B,H,L,hd]
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
    """Causal Gemma-style stack: forward(h [B, L, W], positions [B, L]) -> (out [B, L, W],
    cache). `fast_step = False` runs one-token steps through the reference blocks too."""

    fast_step = True

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
            inv = self.rope_base ** -(half * (2.0 / self.head_dim))
            self._inv_freq[device] = torch.cat([inv, inv])
        return self._inv_freq[device]

    def init_cache(self, batch_size: int, max_len: int,
                   dtype: torch.dtype | None = None) -> KVCache:
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
                raise ValueError(f"KV cache overflow: {start} + {L} tokens > max_len "
                                 f"{cache.max_len}")
            if L == 1 and not self.training and self.fast_step:
                out = decode.step(self, h.reshape(B, -1), positions, cache, attn_mask)
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
