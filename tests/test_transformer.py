"""Gemma-style decoder: reference maths, causality, MQA shapes, RoPE, KV-cache decoding == full
pass, and the fast one-token step (`decode.step`) == the reference blocks."""

import pytest
import torch
import torch.nn.functional as F

from jetformer.models import decode
from jetformer.models.transformer import Decoder, rope_tables, rotate

torch.set_num_threads(1)
WIDTH, DEPTH, HEADS, HEAD_DIM, MLP = 32, 2, 4, 8, 64


def make_decoder(seed=0, dropout=0.0, depth=DEPTH):
    torch.manual_seed(seed)
    dec = Decoder(WIDTH, depth, HEADS, HEAD_DIM, MLP, dropout=dropout, rope_base=10000.0)
    with torch.no_grad():                       # non-trivial norm scales (zero at init)
        for name, p in dec.named_parameters():
            if name.endswith("scale"):
                p.normal_(0, 0.5)
    return dec.eval()


def inputs(B, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, WIDTH, generator=g), torch.arange(L).expand(B, L)


def half_split_rope(x, pos, base=10000.0):
    """Gemma's RoPE written out: pairs (x_i, x_{i+hd/2}) rotated by pos / base^(2i/hd).
    x [..., L, hd], pos [..., L]."""
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(half) * 2.0 / x.shape[-1])
    ang = pos[..., None].float() * inv                                  # [..., L, hd/2]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)


def rope(x, positions, dec):
    """The production rotation (`rope_tables` + `rotate`) of x [B, n, L, hd] at [B, L]."""
    return rotate(x, *rope_tables(positions[:, None], dec.inv_freq(x.device)))


def reference_forward(dec, h, positions):
    """The Gemma-v1 block written out with plain tensor ops (no SDPA, no masks but causal)."""
    def rms(x, scale):
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * (1 + scale)

    def rope(x, pos):                                                   # x [B, L, n, hd]
        return half_split_rope(x.transpose(1, 2), pos[:, None]).transpose(1, 2)

    B, L, _ = h.shape
    x = h
    for blk in dec.blocks:
        at = blk.attn
        y = rms(x, blk.pre_attention_norm.scale)
        q = rope((y @ at.q_proj.weight.T).view(B, L, HEADS, HEAD_DIM), positions)
        k = rope((y @ at.k_proj.weight.T).view(B, L, 1, HEAD_DIM), positions)[:, :, 0]
        v = y @ at.v_proj.weight.T                                      # [B, L, hd]
        logits = torch.einsum("blnh,bsh->bnls", q * HEAD_DIM ** -0.5, k)
        logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        o = torch.einsum("bnls,bsh->blnh", logits.softmax(-1), v).reshape(B, L, -1)
        x = x + o @ at.o_proj.weight.T
        y = rms(x, blk.pre_ffw_norm.scale)
        gate = F.gelu(y @ blk.mlp.gate.weight.T, approximate="tanh")
        x = x + (gate * (y @ blk.mlp.up.weight.T)) @ blk.mlp.down.weight.T
    return rms(x, dec.final_norm.scale)


def test_matches_reference_gemma_block_maths():
    dec = make_decoder()
    h, pos = inputs(2, 7)
    out, cache = dec(h, pos)
    assert cache is None and out.shape == (2, 7, WIDTH)
    torch.testing.assert_close(out, reference_forward(dec, h, pos), rtol=1e-5, atol=1e-5)


def test_multi_query_attention_has_one_kv_head():
    dec = make_decoder()
    for blk in dec.blocks:
        assert blk.attn.q_proj.weight.shape == (HEADS * HEAD_DIM, WIDTH)
        assert blk.attn.k_proj.weight.shape == (HEAD_DIM, WIDTH)
        assert blk.attn.v_proj.weight.shape == (HEAD_DIM, WIDTH)
        assert blk.attn.o_proj.weight.shape == (WIDTH, HEADS * HEAD_DIM)
        assert blk.mlp.gate.weight.shape == blk.mlp.up.weight.shape == (MLP, WIDTH)
    cache = dec.init_cache(3, 10)
    assert cache.k.shape == cache.v.shape == (DEPTH, 3, 10, HEAD_DIM)


def test_norm_scales_start_at_zero():
    dec = Decoder(WIDTH, DEPTH, HEADS, HEAD_DIM, MLP)
    scales = [p for n, p in dec.named_parameters() if n.endswith("scale")]
    assert len(scales) == 2 * DEPTH + 1 and all(torch.all(s == 0) for s in scales)
    # RMSNorm with zero scale gives unit root-mean-square
    x = 5 * torch.randn(4, WIDTH)
    torch.testing.assert_close(dec.final_norm(x).pow(2).mean(-1), torch.ones(4), rtol=1e-4, atol=0)


def test_causality_later_tokens_never_change_earlier_outputs():
    dec = make_decoder()
    h, pos = inputs(2, 9)
    out, _ = dec(h, pos)
    for j in (0, 4, 8):
        h2 = h.clone()
        h2[:, j] += torch.randn(2, WIDTH)
        out2, _ = dec(h2, pos)
        torch.testing.assert_close(out2[:, :j], out[:, :j], rtol=0, atol=1e-6)
        assert (out2[:, j:] - out[:, j:]).abs().amax(-1).min() > 1e-3   # j and after do change


def test_rope_depends_only_on_relative_positions():
    dec = make_decoder()
    h, pos = inputs(2, 6)
    out, _ = dec(h, pos)
    shifted, _ = dec(h, pos + 37)
    torch.testing.assert_close(shifted, out, rtol=1e-4, atol=1e-4)
    permuted, _ = dec(h, pos.flip(-1))
    assert (permuted - out).abs().max() > 1e-2
    # the rotation is Gemma's half-split one, preserves norms and is the identity at position 0
    x = torch.randn(2, 3, 5, HEAD_DIM)
    p = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(rope(x, p, dec), half_split_rope(x, p[:, None]))
    torch.testing.assert_close(rope(x, p, dec).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x, torch.zeros(2, 5, dtype=torch.long), dec), x)


@pytest.mark.parametrize("chunks", [(5, 1, 1, 1, 1, 1, 1), (1,) * 11, (3, 4, 1, 1, 2)])
def test_kv_cache_decoding_equals_full_forward(chunks):
    dec = make_decoder()
    L = sum(chunks)
    h, pos = inputs(3, L)
    full, _ = dec(h, pos)
    cache = dec.init_cache(3, L + 2)
    outs, start = [], 0
    for n in chunks:
        out, cache = dec(h[:, start:start + n], pos[:, start:start + n], cache)
        outs.append(out)
        start += n
    assert cache.length == L
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-5


def test_kv_cache_with_padded_variable_length_prefixes():
    """Rows with different prefix lengths, padded on the left, in the middle, or not at all:
    every real token's output equals running that row alone without padding."""
    dec = make_decoder(seed=3)
    P, G = 6, 4                                 # padded prefix length, generated tokens
    valid = torch.tensor([[0, 0, 1, 1, 1, 1],   # left padding (right-aligned prefix)
                          [1, 1, 0, 0, 1, 1],   # padding in the middle (text pad, then BOI)
                          [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    h, _ = inputs(3, P + G, seed=5)
    valid_all = torch.cat([valid, torch.ones(3, G, dtype=torch.bool)], 1)      # [B, P+G]
    pos = valid_all.long().cumsum(-1) - 1                                    # cumsum(valid) - 1

    # incremental: prefill the padded prefix, then one token at a time
    cache = dec.init_cache(3, P + G)
    outs = [dec(h[:, :P], pos[:, :P], cache, attn_mask=valid)[0]]
    for t in range(P, P + G):
        outs.append(dec(h[:, t:t + 1], pos[:, t:t + 1], cache)[0])
    incremental = torch.cat(outs, 1)
    # full padded pass with the same key-padding mask
    full, _ = dec(h, pos, attn_mask=valid_all)
    assert torch.isfinite(full).all() and torch.isfinite(incremental).all()

    for b in range(3):
        real = valid_all[b]
        alone, _ = dec(h[b:b + 1, real], torch.arange(int(real.sum()))[None])
        assert (incremental[b, real] - alone[0]).abs().max() < 1e-5
        assert (full[b, real] - alone[0]).abs().max() < 1e-5


def test_dropout_only_in_training():
    dec = make_decoder(dropout=0.5)
    h, pos = inputs(2, 5)
    a, _ = dec(h, pos)
    b, _ = dec(h, pos)
    assert torch.equal(a, b)
    dec.train()
    c, _ = dec(h, pos)
    d, _ = dec(h, pos)
    assert (c - d).abs().max() > 1e-3
    # gradients reach every parameter
    (c.pow(2).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


def test_bad_calls_fail_clearly():
    dec = make_decoder()
    h, pos = inputs(2, 4)
    cache = dec.init_cache(2, 5)
    dec(h, pos, cache)
    with pytest.raises(ValueError, match="overflow"):
        dec(h[:, :2], pos[:, :2], cache)
    with pytest.raises(ValueError, match="positions"):
        dec(h, pos[:, :3])
    with pytest.raises(ValueError, match="batch"):
        dec(h, pos, dec.init_cache(3, 8))
    with pytest.raises(ValueError, match="even head_dim"):
        Decoder(WIDTH, 1, HEADS, 7, MLP)


def test_kv_cache_under_bf16_autocast_keeps_dtypes_consistent():
    # the CUDA recipe runs the decoder under bf16 autocast with an fp32 cache (here on the CPU)
    dec = make_decoder()
    h, pos = inputs(2, 8)
    ref, _ = dec(h, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = dec.init_cache(2, 8)
        outs = [dec(h[:, :3], pos[:, :3], cache)[0]]
        outs += [dec(h[:, t:t + 1], pos[:, t:t + 1], cache)[0] for t in range(3, 8)]
    incremental = torch.cat(outs, 1)
    assert cache.k.dtype == torch.float32 and incremental.dtype == torch.float32
    assert (incremental - ref).abs().max() < 0.1


def test_single_token_steps_with_padding_tokens_match_the_full_pass():
    """One-token steps (the decoding fast path) fed a padding token: it attends to itself (its
    own output equals the full pass with the same key mask) and no later token attends to it."""
    dec = make_decoder(seed=4)
    L = 7
    h, _ = inputs(2, L, seed=6)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[0, 3] = valid[1, 5] = False                        # padding stepped in one at a time
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    full, _ = dec(h, pos, attn_mask=valid)
    cache = dec.init_cache(2, L)
    outs = [dec(h[:, :2], pos[:, :2], cache, attn_mask=valid[:, :2])[0]]
    outs += [dec(h[:, t:t + 1], pos[:, t:t + 1], cache, attn_mask=valid[:, t:t + 1])[0]
             for t in range(2, L)]
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-5
    for b in range(2):                               # real tokens: as if the pad were absent
        real = valid[b]
        alone, _ = dec(h[b:b + 1, real], torch.arange(int(real.sum()))[None])
        assert (full[b, real] - alone[0]).abs().max() < 1e-5


def stepped(dec, h, pos, valid, prefix, fast):
    """Prefill `prefix` tokens, then one-token steps with their key masks, fast or reference."""
    dec.fast_step = fast
    try:
        cache = dec.init_cache(h.shape[0], h.shape[1])
        outs = [dec(h[:, :prefix], pos[:, :prefix], cache, attn_mask=valid[:, :prefix])[0]]
        outs += [dec(h[:, t:t + 1], pos[:, t:t + 1], cache, attn_mask=valid[:, t:t + 1])[0]
                 for t in range(prefix, h.shape[1])]
    finally:
        del dec.fast_step
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("depth,batch", [(1, 1), (3, 5)])
def test_fast_decode_step_equals_the_reference_blocks(depth, batch):
    """`decode.step` (folded norms, fused projections, additive key bias) against the reference
    blocks run one token at a time on the same cache, with padding in prefix and steps and
    non-trivial norm scales: same outputs, same cached keys and values, same valid slots."""
    dec = make_decoder(seed=7, depth=depth)
    L, prefix = 9, 3
    g = torch.Generator().manual_seed(8)
    h = torch.randn(batch, L, WIDTH, generator=g)
    valid = torch.rand(batch, L, generator=g) > 0.25
    valid[:, prefix - 1] = True
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    fast, fast_cache = stepped(dec, h, pos, valid, prefix, fast=True)
    ref, ref_cache = stepped(dec, h, pos, valid, prefix, fast=False)
    assert fast_cache.step_weights is not None and ref_cache.step_weights is None  # paths differ
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_cache.kv, ref_cache.kv, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast_cache.valid, ref_cache.valid) and torch.equal(fast_cache.valid, valid)
    assert fast_cache.length == ref_cache.length == L
    # the fast path's folded-norm identity on its own: RMSNorm(x) @ Wᵀ
    blk = dec.blocks[0]
    x = 3 * torch.randn(4, WIDTH, generator=g)
    eps, w_qkv = decode.step_weights(dec)[0][0][:2]
    folded = (x @ w_qkv.T) / decode.rms_denominator(x, eps)
    w = torch.cat([blk.attn.q_proj.weight, blk.attn.k_proj.weight, blk.attn.v_proj.weight])
    torch.testing.assert_close(folded, blk.pre_attention_norm(x) @ w.T, rtol=1e-5, atol=1e-5)
