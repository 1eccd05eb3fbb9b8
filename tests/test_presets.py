"""Model presets: the paper's sizes (parameter counts on the meta device) and the tiny default."""
import json
import resource

import pytest

from jetformer.cli import main
from jetformer.config import REPO_ROOT, load_config
from jetformer.models.summary import parameter_counts

PARAMS = REPO_ROOT / "params.yaml"
PAPER_L_TOTAL = 2.75e9           # paper Table 1/3: JetFormer-L, 2.75B parameters
BREAKDOWN = ("params_flow", "params_transformer", "params_gmm_head", "params_text_head",
             "params_embeddings")


def test_jetformer_l_matches_paper_total_via_cli(capsys):
    """`python -m jetformer info --preset jetformer_l --json`: total within 10% of 2.75B, the
    breakdown sums to it, and no weights were allocated (meta device)."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    assert main(["info", "--preset", "jetformer_l", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rss_grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert rss_grown_mib < 500, f"info allocated {rss_grown_mib:.0f} MiB (10 GiB if real weights)"
    assert abs(info["params_total"] / PAPER_L_TOTAL - 1) < 0.10, info
    assert sum(info[k] for k in BREAKDOWN) == info["params_total"]
    # official sizes: GMM head = width x (K + 2Kd) + bias; flow = 32 couplings of 6 ViT blocks
    assert info["params_gmm_head"] == 1536 * (1024 + 2 * 1024 * 128) + (1024 + 2 * 1024 * 128)
    assert 0.55e9 < info["params_flow"] < 0.7e9
    assert info["image_tokens"] == 256 and info["token_dim"] == 768


@pytest.mark.parametrize("preset, backbone", [("jetformer_b", 350e6), ("jetformer_m", 750e6)])
def test_backbone_sizes_match_their_names(preset, backbone):
    counts = parameter_counts(load_config(PARAMS, overlays=[preset]))
    assert abs(counts["params_transformer"] / backbone - 1) < 0.10, counts
    assert sum(counts[k] for k in BREAKDOWN) == counts["params_total"]


def test_paper_presets_share_the_recipe():
    for name in ("jetformer_b", "jetformer_m", "jetformer_l"):
        cfg = load_config(PARAMS, overlays=[name])
        m, t = cfg.model, cfg.train
        assert (cfg.data.resolution, m.patch_size, m.factored_dims, m.num_mixtures) \
            == (256, 16, 128, 1024)
        assert (m.flow.num_couplings, m.flow.width, m.flow.num_heads) == (32, 512, 8)
        assert (t.batch_size, t.noise.sigma0, t.noise.sigma_final, t.task) \
            == (2048, 64.0, 0.0, "class")
    # the multimodal recipes layer on top of a size preset
    cfg = load_config(PARAMS, overlays=["jetformer_l", "coco_ti"])
    assert cfg.model.conditioning == "text" and cfg.model.decoder.depth == 48
    counts = parameter_counts(cfg)
    assert counts["params_text_head"] == 1536 * cfg.tokenizer.vocab_size


def test_tiny_preset_restates_the_default_model():
    default, tiny = load_config(PARAMS), load_config(PARAMS, overlays=["tiny"])
    assert tiny.to_dict() == default.to_dict()
    # layered over a paper preset it shrinks the model and keeps the recipe (class-conditional)
    shrunk = load_config(PARAMS, overlays=["jetformer_l", "tiny"])
    recipe_keys = ("conditioning", "num_classes", "ema_decay")
    sizes = {k: v for k, v in shrunk.to_dict()["model"].items() if k not in recipe_keys}
    assert sizes == {k: v for k, v in default.to_dict()["model"].items() if k not in recipe_keys}
    assert shrunk.data.resolution == default.data.resolution and shrunk.train.task == "class"
    assert parameter_counts(shrunk)["params_total"] < 5e6
    # the flow is deep enough not to saturate its scale cap: 2^(couplings/2) per dimension
    assert default.model.flow.num_couplings >= 16


def test_info_human_readable(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "params_total" in out and "params_flow" in out
    assert main(["info", "--preset", "no_such_preset"]) == 1


@pytest.mark.parametrize("recipe", ["coco_t2i", "coco_ti"])
@pytest.mark.parametrize("size, expected", [("jetformer_b", (9.0, 0.96)),
                                            ("jetformer_m", (8.0, 0.94)),
                                            ("jetformer_l", (6.0, 0.96))])
def test_t2i_sampling_settings_follow_the_size(recipe, size, expected):
    """Official T2I cfg_scale/temperature per size: the recipe layered over a size preset (the
    documented order) samples with the size's settings, not one fixed pair."""
    e = load_config(PARAMS, overlays=[size, recipe]).eval
    assert (e.cfg_scale, e.temperature) == expected
    # a command-line override still beats both
    e = load_config(PARAMS, overlays=[size, recipe], overrides=["eval.cfg_scale=1.5"]).eval
    assert e.cfg_scale == 1.5 and e.temperature == expected[1]
    # the ImageNet class-conditional settings of the size are untouched without the recipe
    assert load_config(PARAMS, overlays=[size]).eval.cfg_scale not in (9.0, 8.0, 6.0)
