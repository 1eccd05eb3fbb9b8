"""Jet: a normalizing flow of channel-wise affine couplings with ViT blocks (paper §4, Jet paper).

Works on the token grid `[B, N, D]` produced by `patchify` (D = p*p*C). Each coupling:
  permute channels (fixed random permutation) -> split 50/50 into (x1, x2)
  b, s = Dense0(LN(ViT(Dense(x1) + posemb)))        # Dense0 zero-initialised
  y2 = (x2 + b) * 2*sigmoid(s);   logdet += sum(log_sigmoid(s) + ln 2)
  un-permute [x1, y2]
Zero-initialised output => b = 0, 2*sigmoid(0) = 1: the flow starts as the identity.
The inverse is closed form: x2 = y2 / (2*sigmoid(s)) - b (x1 passes through unchanged).
Official code: big_vision/models/proj/jet/jet.py (`Coupling`, `Model`). The scale lies in (0, 2),
so K couplings can expand a dimension by at most 2^(K/2): watch logdet per dim in training.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patch channels ordered (row, col, colour)."""
    B, H, W, C = x.shape
    if H % p or W % p:
        raise ValueError(f"patchify: image size {H}x{W} is not divisible by patch size {p}")
    x = x.reshape(B, H // p, p, W // p, p, C)        # [B, h, p, w, p, C]
    x = x.permute(0, 1, 3, 2, 4, 5)                   # [B, h, w, p, p, C]
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: torch.Tensor, p: int, H: int, W: int) -> torch.Tensor:
    """[B, (H/p)(W/p), p*p*C] -> [B, H, W, C]; exact inverse of `patchify`."""
    B, N, D = tokens.shape
    h, w = H // p, W // p
    if h * w != N or D % (p * p):
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not fit a {H}x{W} image "
                         f"with patch size {p}")
    C = D // (p * p)
    x = tokens.reshape(B, h, w, p, p, C).permute(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
    return x.reshape(B, H, W, C)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"Attention: width {width} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, W // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))           # [B, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v)              # [B, H, N, hd]
        return self.dropout(self.proj(out.transpose(1, 2).reshape(B, N, W)))


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CouplingNet(nn.Module):
    """x1 [B, N, D1] -> (shift b, raw scale s), each [B, N, D2]; zero output at init."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, width: int, depth: int,
                 num_heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.posemb = nn.Parameter(torch.randn(1, num_tokens, width) / math.sqrt(width))
        self.blocks = nn.ModuleList(ViTBlock(width, num_heads, mlp_dim, dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2 * out_dim)
        nn.init.zeros_(self.out.weight)   # identity flow at init
        nn.init.zeros_(self.out.bias)

    def forward(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x1) + self.posemb                 # [B, N, width]
        for block in self.blocks:
            h = block(h)
        shift, raw_scale = self.out(self.norm(h)).chunk(2, dim=-1)  # [B, N, D2] each
        return shift, raw_scale


class Coupling(nn.Module):
    """One channel-wise affine coupling with its own fixed random channel permutation.

    The permutation is folded into the coupling net's first and last linear layers (no gather,
    split or concatenation of activations): the embedding reads the full token through a weight
    whose columns outside x1 are zero, and the output layer writes (shift, raw scale) for all D
    channels with zero rows for x1's. A raw scale of 0 gives 2*sigmoid(0) = 1 and a log-scale
    log_sigmoid(0) + ln 2 = 0, so x1 passes through unchanged and adds nothing to the log-det:
    the same map as permute -> split -> affine on x2 -> un-permute (`reference_forward`). The
    parameters keep their compact shapes ([width, D1] and [2*D2, width]); the scattered copies
    are rebuilt from them in each call (two small ops; gradients flow back to the compact ones).
    """

    def __init__(self, num_tokens: int, dim: int, width: int, depth: int, num_heads: int,
                 mlp_dim: int, dropout: float, generator: torch.Generator):
        super().__init__()
        self.dim = dim
        self.split = dim // 2                             # x1 = first half after permuting
        perm = torch.randperm(dim, generator=generator)
        self.register_buffer("perm", perm)                # frozen, saved in the state_dict
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.net = CouplingNet(num_tokens, self.split, dim - self.split, width, depth,
                               num_heads, mlp_dim, dropout)

    def _folded_net(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`net(x[..., perm[:split]])` scattered back to channel order: (shift, raw scale),
        each [B, N, D], exactly zero on the x1 channels."""
        net, D = self.net, self.dim
        x1_channels, x2_channels = self.perm[:self.split], self.perm[self.split:]
        w_in = net.embed.weight.new_zeros(net.embed.out_features, D)
        w_in = w_in.index_copy(1, x1_channels, net.embed.weight)            # [width, D]
        rows = torch.cat([x2_channels, x2_channels + D])                    # shift | raw scale
        w_out = net.out.weight.new_zeros(2 * D, net.out.in_features).index_copy(
            0, rows, net.out.weight)                                        # [2D, width]
        b_out = net.out.bias.new_zeros(2 * D).index_copy(0, rows, net.out.bias)
        h = F.linear(x, w_in, net.embed.bias) + net.posemb                  # [B, N, width]
        for block in net.blocks:
            h = block(h)
        shift, raw_scale = F.linear(net.norm(h), w_out, b_out).chunk(2, dim=-1)
        return shift, raw_scale

    def _affine(self, x: torch.Tensor):
        shift, raw_scale = self._folded_net(x)
        # the affine map itself stays in the input precision (fp32), also under bf16 autocast
        shift, raw_scale = shift.to(x.dtype), raw_scale.to(x.dtype)
        return shift, 2.0 * torch.sigmoid(raw_scale), F.logsigmoid(raw_scale) + math.log(2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, log_scale = self._affine(x)
        return (x + shift) * scale, log_scale.sum(dim=(1, 2))             # [B, N, D], [B]

    def token_logdet(self, x: torch.Tensor) -> torch.Tensor:
        """log|det| of `forward(x)` per token [B, N]: it sums to forward's log-det."""
        return self._affine(x)[2].sum(-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        shift, scale, _ = self._affine(y)                 # x1 = y1: the net sees the same input
        return y / scale - shift

    def reference_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The coupling written with explicit gathers (the module docstring's definition):
        slower, kept as the reference the folded `forward` is tested against."""
        x = x[..., self.perm]
        x1, x2 = x[..., :self.split], x[..., self.split:]
        shift, raw_scale = self.net(x1)
        shift, raw_scale = shift.to(x.dtype), raw_scale.to(x.dtype)
        y2 = (x2 + shift) * (2.0 * torch.sigmoid(raw_scale))
        y = torch.cat([x1, y2], dim=-1)[..., self.inv_perm]
        return y, (F.logsigmoid(raw_scale) + math.log(2.0)).sum(dim=(1, 2))


class Jet(nn.Module):
    """Normalizing flow on `[B, N, D]` tokens: `forward(x) -> (z, logdet [B])`, `inverse(z) -> x`.

    `seed` draws the couplings' channel permutations (a private torch.Generator, so the same
    seed gives the same flow on every worker); they are buffers stored in the state_dict.
    """

    def __init__(self, num_tokens: int, dim: int, num_couplings: int, width: int, depth: int,
                 num_heads: int, mlp_dim: int, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"Jet: a channel coupling needs dim >= 2, got dim={dim}")
        if num_couplings < 1:
            raise ValueError(f"Jet: num_couplings must be >= 1, got {num_couplings}")
        self.num_tokens, self.dim = num_tokens, dim
        generator = torch.Generator().manual_seed(seed)
        self.couplings = nn.ModuleList(
            Coupling(num_tokens, dim, width, depth, num_heads, mlp_dim, dropout, generator)
            for _ in range(num_couplings))

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.num_tokens, self.dim):
            raise ValueError(f"Jet.{name}: expected [B, {self.num_tokens}, {self.dim}], "
                             f"got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "forward")
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for coupling in self.couplings:
            x, ld = coupling(x)
            logdet = logdet + ld
        return x, logdet                                  # [B, N, D], [B]

    def reference_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` through every coupling's gather-based `reference_forward` (tests)."""
        self._check(x, "reference_forward")
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for coupling in self.couplings:
            x, ld = coupling.reference_forward(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, "inverse")
        for coupling in reversed(self.couplings):
            z = coupling.inverse(z)
        return z                                          # [B, N, D]
