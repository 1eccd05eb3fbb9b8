"""The speed work keeps the maths: the training loss and its gradients of the fast paths equal
those of the reference paths (gather-based couplings, eager instead of `torch.compile`)."""
from contextlib import contextmanager

import pytest
import torch

from jetformer.models.jetformer import JetFormer


@contextmanager
def reference_couplings(model: JetFormer):
    """Run every flow coupling through its gather-based `reference_forward`."""
    couplings = list(model.codec.flow.couplings)
    for c in couplings:
        c.forward = c.reference_forward
    try:
        yield
    finally:
        for c in couplings:
            del c.forward


def loss_and_grads(model, batch, seed, loss_fn=None):
    """Training loss (noise, latent noise, CFG drop and dropout on) and every gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                                           # dropout masks
    out = (loss_fn or model.compute_loss)(batch, 8.0, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def batch_for(model, B=6):
    g = torch.Generator().manual_seed(1)
    R = model.codec.resolution
    batch = {"images": torch.randint(0, 256, (B, R, R, 3), generator=g, dtype=torch.uint8)}
    if model.conditioning == "class":
        batch["labels"] = torch.arange(B) % model.num_classes
    else:
        batch["text"] = torch.randint(4, model.vocab_size, (B, 8), generator=g)
        batch["text_mask"] = torch.arange(8)[None] < torch.tensor([3, 8, 5, 8, 2, 6])[:, None]
        batch["image_first"] = torch.tensor([False, True, False, True, False, False])
    return batch


@pytest.mark.parametrize("overrides", [
    ("model.factoring=post_flow", "train.task=both"),
    ("model.factoring=learnable_w", "train.task=both"),
    ("model.conditioning=class", "train.task=class", "model.num_classes=3"),
])
def test_loss_and_gradients_match_the_reference_couplings(make_cfg, randomize, overrides):
    cfg = make_cfg("model.decoder.dropout=0.1", "model.latent_noise_max=0.3", *overrides)
    torch.manual_seed(0)
    model = randomize(JetFormer.from_config(cfg, vocab_size=cfg.tokenizer.vocab_size).train(),
                      out_std=0.1)
    batch = batch_for(model)
    loss, grads = loss_and_grads(model, batch, seed=3)
    with reference_couplings(model):
        ref_loss, ref_grads = loss_and_grads(model, batch, seed=3)
    assert grads.keys() == ref_grads.keys()
    assert any(k.startswith("codec.") for k in grads)                # the flow is trained
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5, msg=k)
    # control: another seed (other noise and dropout) changes the loss well beyond that
    assert (loss_and_grads(model, batch, seed=4)[0] - loss).abs() > 1e-3


@pytest.mark.slow
def test_compiled_loss_matches_eager(make_cfg, randomize):
    """`train.compile`: torch.compile of the loss gives the eager loss and gradients (dropout
    off: compiled dropout draws its masks from another generator)."""
    cfg = make_cfg("model.decoder.dropout=0.0", "model.conditioning=class", "train.task=class",
                   "model.num_classes=3", "model.flow.num_couplings=2", "model.decoder.depth=1")
    torch.manual_seed(0)
    model = randomize(JetFormer.from_config(cfg, vocab_size=cfg.tokenizer.vocab_size).train(),
                      out_std=0.1)
    batch = batch_for(model)
    loss, grads = loss_and_grads(model, batch, seed=3)
    c_loss, c_grads = loss_and_grads(model, batch, seed=3,
                                     loss_fn=torch.compile(model.compute_loss))
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-5)
    assert c_grads.keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(c_grads[k], grads[k], rtol=1e-5, atol=1e-5, msg=k)
