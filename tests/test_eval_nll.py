"""Held-out NLL of the evaluation: the conditional number (`val_bits_per_dim`, as in training)
and the unconditional one ([NOLABEL], `val_uncond_bits_per_dim`) are different quantities."""
import pytest
import torch

from jetformer.eval.nll import heldout_bits_per_dim
from jetformer.eval.report import BASELINE_CHECKS, REQUIRED_KEYS
from jetformer.models.jetformer import JetFormer


@pytest.fixture
def class_model(make_cfg, randomize):
    cfg = make_cfg("model.conditioning=class", "train.task=class", "model.num_classes=4",
                   "model.decoder.dropout=0.0")
    return randomize(JetFormer.from_config(cfg, vocab_size=16), std=0.2, out_std=0.2).eval()


def test_conditional_and_unconditional_nll_are_both_reported(class_model):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    cond = heldout_bits_per_dim(class_model, images, batch_size=4, labels=labels)
    uncond = heldout_bits_per_dim(class_model, images, batch_size=4)
    # batching and the fixed dequantisation seed reproduce the model's own per-image numbers
    ref = class_model.image_bits_per_dim(images, generator=torch.Generator().manual_seed(0),
                                         labels=labels)
    assert torch.allclose(cond[:4], ref[:4].double(), atol=1e-5)
    assert (cond - uncond).abs().min() > 1e-4                   # the label changes the NLL
    other = heldout_bits_per_dim(class_model, images, batch_size=4, labels=(labels + 1) % 4)
    assert (cond - other).abs().max() > 1e-4
    with pytest.raises(ValueError, match="labels has 5 rows for 6 images"):
        heldout_bits_per_dim(class_model, images, labels=labels[:5])
    assert {"val_bits_per_dim", "val_uncond_bits_per_dim"} <= set(REQUIRED_KEYS)
    assert BASELINE_CHECKS["val_uncond_bits_per_dim"] == ("png_bits_per_dim", "<")
