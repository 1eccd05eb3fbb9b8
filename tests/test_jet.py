"""Jet flow: patchify layout, identity at init, exact inverse, log-det = log|det J|, mixing."""
import pytest
import torch

from jetformer.models.jet import Jet, patchify, unpatchify


def small_jet(num_tokens=4, dim=12, num_couplings=4, seed=0):
    return Jet(num_tokens, dim, num_couplings, width=16, depth=1, num_heads=2, mlp_dim=32,
               seed=seed)


def test_patchify_layout_and_inverse():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).view(2, 4, 6, 3)
    tokens = patchify(x, 2)                                          # [2, 6, 12]
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(tokens[1, 0], x[1, 0:2, 0:2].reshape(-1))    # (row, col, colour)
    assert torch.equal(tokens[1, 4], x[1, 2:4, 2:4].reshape(-1))    # row-major patch order
    assert torch.equal(unpatchify(tokens, 2, 4, 6), x)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(x, 4)


def test_identity_at_init():
    torch.manual_seed(0)
    jet = small_jet()
    x = torch.randn(3, 4, 12)
    z, logdet = jet(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(3))


def test_inverse_of_forward_with_random_weights(randomize):
    torch.manual_seed(0)
    jet = randomize(Jet(16, 48, 16, width=32, depth=2, num_heads=4, mlp_dim=64).eval(),
                    out_std=0.05)
    x = torch.rand(4, 16, 48) * 2 - 1                                # model-space scale
    z, logdet = jet(x)
    assert (z - x).abs().max() > 1.0                                  # clearly not the identity
    assert logdet.abs().min() > 10.0                                  # of 768 dims
    assert (jet.inverse(z) - x).abs().max() < 1e-4


def test_logdet_equals_log_abs_det_jacobian(randomize):
    torch.manual_seed(0)
    jet = randomize(small_jet()).double().eval()                     # 4 tokens x 12 dims
    x = torch.randn(1, 4, 12, dtype=torch.float64)
    _, logdet = jet(x)
    jac = torch.autograd.functional.jacobian(lambda v: jet(v.view(1, 4, 12))[0].flatten(),
                                             x.flatten())             # [48, 48]
    assert abs(logdet.item()) > 0.5                                   # non-trivial volume change
    assert logdet.item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-8)


def _token_block_is_dense(jet, d, num_tokens, dim):
    """|d z[n, :d] / d x[n, :]| > 0 for every modelled dim, input channel and token n."""
    x = torch.randn(1, num_tokens, dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: jet(v)[0][..., :d], x)
    jac = jac[0, :, :, 0]                                             # [N, d, N, D]
    blocks = torch.stack([jac[n, :, n, :] for n in range(num_tokens)])  # [N, d, D]
    cross = jac[0, :, 1:, :]                                          # token 0 sees other tokens
    return bool((blocks.abs() > 1e-9).all()), bool((cross.abs() > 1e-9).any())


def test_modelled_dims_mix_all_input_channels(randomize):
    """The default flow shape (p=4: D=48, 16 couplings, d=16): the dims the transformer models
    depend on every input channel (a permutation that is never applied would leave some of
    them raw pixels), and on other tokens through attention."""
    torch.manual_seed(0)
    jet = randomize(Jet(4, 48, 16, width=16, depth=1, num_heads=2, mlp_dim=32)).double().eval()
    dense, cross = _token_block_is_dense(jet, 16, 4, 48)
    assert dense and cross
    # control: the same check catches a flow whose permutations are the identity
    with torch.no_grad():
        for c in jet.couplings:
            c.perm.copy_(torch.arange(48))
            c.inv_perm.copy_(torch.arange(48))
    assert _token_block_is_dense(jet, 16, 4, 48)[0] is False


def test_permutations_are_seeded_frozen_buffers():
    a, b, c = small_jet(seed=0), small_jet(seed=0), small_jet(seed=1)
    perms = [cp.perm for cp in a.couplings]
    assert all(torch.equal(p, q.perm) for p, q in zip(perms, b.couplings))
    assert not all(torch.equal(p, q.perm) for p, q in zip(perms, c.couplings))
    assert len({tuple(p.tolist()) for p in perms}) == len(perms)      # one per coupling
    assert all(sorted(p.tolist()) == list(range(12)) for p in perms)
    names = [n for n, _ in a.named_parameters()]
    assert not any("perm" in n for n in names)                        # not trained
    assert "couplings.0.perm" in a.state_dict()
    c.load_state_dict(a.state_dict())                                 # checkpoints restore them
    assert all(torch.equal(p, q.perm) for p, q in zip(perms, c.couplings))


def test_rejects_wrong_shapes():
    jet = small_jet()
    with pytest.raises(ValueError, match=r"\[B, 4, 12\]"):
        jet(torch.randn(2, 4, 10))
    with pytest.raises(ValueError, match="dim >= 2"):
        Jet(4, 1, 2, 16, 1, 2, 32)


def test_folded_couplings_match_gather_reference(randomize):
    """The permutation-folded couplings compute the same map, log-det and gradients (w.r.t.
    every parameter and the input) as the explicit permute/split/concat definition."""
    torch.manual_seed(0)
    jet = randomize(Jet(16, 48, 6, width=32, depth=2, num_heads=4, mlp_dim=64), out_std=0.1)
    x = (torch.rand(3, 16, 48) * 2 - 1).requires_grad_()

    def run(fn):
        jet.zero_grad()
        x.grad = None
        z, logdet = fn(x)
        (z.square().sum() * 1e-2 + logdet.sum()).backward()
        return z.detach(), logdet.detach(), x.grad.clone(), [p.grad.clone() for p in
                                                             jet.parameters()]

    z, ld, gx, gp = run(jet)
    z_ref, ld_ref, gx_ref, gp_ref = run(jet.reference_forward)
    assert (z - x).abs().max() > 0.5 and ld.abs().min() > 1.0        # far from the identity
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert all(g.abs().max() > 0 for g in gp_ref)                    # every parameter is used
    for g, g_ref in zip(gp, gp_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    # control: the same comparison fails when one coupling's permutation is changed
    with torch.no_grad():
        jet.couplings[2].perm.copy_(jet.couplings[2].perm.roll(1))
    assert not torch.allclose(jet(x)[0], z_ref, atol=1e-3)
