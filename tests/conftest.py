"""Shared test fixtures: small configs built through the real `load_config`."""
from collections import Counter

import pytest
import torch

from jetformer.config import REPO_ROOT, load_config

PARAMS = REPO_ROOT / "params.yaml"

# 8x8 images, p=2: 16 tokens of 12 dims, d=4; a 4-coupling flow and a 2-layer decoder.
TINY_OVERRIDES = (
    "data.resolution=8", "model.patch_size=2", "model.factored_dims=4",
    "model.flow.num_couplings=4", "model.flow.width=16", "model.flow.depth=1",
    "model.flow.num_heads=2", "model.flow.mlp_dim=32",
    "model.decoder.width=32", "model.decoder.depth=2", "model.decoder.num_heads=2",
    "model.decoder.head_dim=16", "model.decoder.mlp_dim=64", "model.num_mixtures=2",
    "model.num_class_tokens=2", "tokenizer.max_text_len=8",
    "train.batch_size=4", "train.num_workers=1", "train.steps=10",
)


def pytest_collection_modifyitems(config, items):
    """Modules with the most `slow` tests first (stable otherwise). Under `make test`'s
    `-n ... --dist loadscope --no-loadscope-reorder` each process takes one module at a time in
    this order, so the longest module (the DVC pipeline's) starts at once, not last."""
    slow = Counter(item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])


def make_tiny_cfg(*extra_overrides: str):
    """The tiny config with further `key=value` overrides (later ones win)."""
    return load_config(PARAMS, overrides=TINY_OVERRIDES + tuple(extra_overrides))


@pytest.fixture
def tiny_cfg():
    return make_tiny_cfg()


@pytest.fixture(autouse=True)
def _single_thread():
    """2 shared CPU cores: keep each test on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_cfg():
    """`make_cfg("model.factoring=pca", ...)` -> the tiny config with more overrides."""
    return make_tiny_cfg


def randomize_(module: torch.nn.Module, std: float = 0.05, out_std: float = 0.2, seed: int = 0):
    """Perturb every parameter in place (seeded), so zero-initialised layers (the flow's
    coupling outputs, GMM heads) are no longer zero and the model is far from identity.
    Parameters named `*.out.*` (the couplings' zero-init output Dense) get `out_std`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            s = out_std if ".out." in f".{name}" else std
            p.add_(s * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p))
    return module


@pytest.fixture
def randomize():
    """`randomize(module, std=0.05, out_std=0.2, seed=0)` -> the module, perturbed in place."""
    return randomize_


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project dir with the micro world prepared and a tokenizer trained (module-scoped)."""
    from jetformer.data.prepare import prepare
    from jetformer.data.tokenizer import train_tokenizer, training_texts
    root = tmp_path_factory.mktemp("project")
    torch.set_num_threads(1)
    cfg = load_config(REPO_ROOT / "params.yaml", overlays=["micro"], overrides=[
        f"data.synthetic.out_dir={root / 'data/raw/shapes'}",
        f"data.prepared_dir={root / 'data/prepared'}",
        f"tokenizer.out_path={root / 'models/tokenizer.model'}"])
    prepare(cfg)
    train_tokenizer(training_texts(cfg.data.prepared_dir), cfg.tokenizer.out_path,
                    cfg.tokenizer.vocab_size)
    return root
