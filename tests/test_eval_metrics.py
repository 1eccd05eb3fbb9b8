"""Evaluation metrics against hand-computed values: VQA accuracy, CIDEr, PNG bits/dim, baselines."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from jetformer.eval import baselines
from jetformer.eval.cider import cider_score, ptb_tokenize
from jetformer.eval.nll import png_bits_per_dim
from jetformer.eval.vqa import normalize_answer, process_punctuation, vqa_accuracy, vqa_score

ANSWERS = ["2", "2", "2", "two", "two", "3", "3", "3", "3", "4"]


# ----------------------------------------------------------------------------- VQA
def test_normalisation_official_rules():
    assert normalize_answer("Two.") == "2"      # period stripped, lower-cased, number word -> digit
    assert normalize_answer("  the  Dog ") == "dog"   # articles dropped
    assert normalize_answer("dont know") == "don't know"  # contractions restored
    assert normalize_answer("1,000") == "1000"        # digit,digit comma: punctuation deleted
    assert normalize_answer("3.5") == "3.5"           # a period before a digit is kept
    assert normalize_answer("red/blue") == "red blue"  # a glued mark becomes a space
    assert normalize_answer("red / blue") == "red blue"
    assert process_punctuation("yes!") == "yes "


def test_vqa_accuracy_worked_example():
    # "Two." -> "2": three annotators said "2". Leaving out one of those three leaves 2 matches
    # (2/3); leaving out any of the other 7 leaves 3 matches (1). (3*2/3 + 7*1) / 10 = 0.9
    assert vqa_accuracy("Two.", ANSWERS) == pytest.approx(0.9)
    # "three" -> "3": four matches, >= 3 in every 9-subset
    assert vqa_accuracy("three", ANSWERS) == pytest.approx(1.0)
    # "4": one match; 0 when it is left out, else 1/3 -> 9/30
    assert vqa_accuracy("4", ANSWERS) == pytest.approx(0.3)
    assert vqa_accuracy("five", ANSWERS) == 0.0
    # human answers are NOT digit/article-normalised (official quirk): "two" never matches "2"
    assert vqa_accuracy("two", ANSWERS) == pytest.approx(0.9)
    # unanimous answers: all 9 others match
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0


def test_vqa_score_aggregates_per_type():
    qs = [{"answers": ANSWERS, "answer_type": "number", "question_type": "how many"},
          {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is there"},
          {"answers": ["red"] * 7 + ["blue"] * 3, "answer_type": "other",
           "question_type": "what color"}]
    s = vqa_score(["4", "no", "blue"], qs)
    # "blue": 3 matches; left out (3 times) -> 2/3, else 1 -> (3*2/3 + 7)/10 = 0.9
    assert s["per_question"] == pytest.approx([0.3, 0.0, 0.9])
    assert s["accuracy"] == pytest.approx(1.2 / 3)
    assert s["per_answer_type"] == pytest.approx({"number": 0.3, "other": 0.9, "yes/no": 0.0})
    with pytest.raises(ValueError, match="predictions"):
        vqa_score(["x"], qs)


# ----------------------------------------------------------------------------- CIDEr
def test_ptb_tokenizer():
    assert ptb_tokenize("A man's RED-haired dog, isn't it?") == "a man 's red-haired dog is n't it"
    assert ptb_tokenize("Two circles.\n") == "two circles"


def test_cider_identical_and_disjoint():
    refs = {1: ["a red circle on the left"], 2: ["two blue squares at the top"],
            3: ["one green triangle in the middle"]}
    same, per = cider_score({k: v[0] for k, v in refs.items()}, refs)
    # every n-gram vector equals its reference, cosine 1 for n = 1..4, no length penalty: 10 * 1
    assert same == pytest.approx(10.0)
    assert all(s == pytest.approx(10.0) for s in per.values())
    disjoint, _ = cider_score({1: "big yellow star", 2: "small purple heart", 3: "an orange moon"},
                              refs)
    assert disjoint == 0.0


def test_cider_hand_computed():
    # 2 images, idf = log(2) - log(max(1, df)) = log 2 for every n-gram seen in one image or none.
    # image 1: "a b" vs ["a b"]: unigram cos 1, bigram cos 1, no 3/4-grams -> 10 * 2/4 = 5
    # image 2: "c e" vs ["c d"]: unigram cos = log2^2 / (sqrt2 log2)^2 = 1/2, bigram 0 -> 10 * 0.5/4
    score, per = cider_score({1: "A b.", 2: "c e"}, {1: ["a b"], 2: ["c d"]})
    assert per[1] == pytest.approx(5.0)
    assert per[2] == pytest.approx(1.25)
    assert score == pytest.approx(3.125)


def test_cider_bad_input():
    with pytest.raises(ValueError, match="different images"):
        cider_score({1: "x"}, {1: ["x"], 2: ["y"]})


# ----------------------------------------------------------------------------- PNG bits/dim
def test_png_bits_per_dim_matches_file_size():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    flat = np.full((1, 16, 16, 3), 77, dtype=np.uint8)
    bpd = png_bits_per_dim(torch.from_numpy(np.concatenate([noise, flat])))
    buf = io.BytesIO()
    Image.fromarray(noise[0]).save(buf, format="PNG", optimize=True, compress_level=9)
    assert bpd[0].item() == pytest.approx(8 * len(buf.getvalue()) / (16 * 16 * 3))
    assert bpd[0] > 8.0          # incompressible noise costs more than raw bytes (headers)
    assert bpd[1] < 1.0          # a flat image compresses well


# ----------------------------------------------------------------------------- baselines
def test_baselines_hand_computed():
    assert baselines.most_frequent_rate(["a", "b", "a", "c"]) == 0.5
    asked = [{"shape": "circle", "color": "red"}, {"shape": "circle", "color": "blue"},
             {"shape": "square", "color": "red"}, {"shape": "circle", "color": "green"}]
    assert baselines.constant_attribute_accuracy(asked) == pytest.approx((3 / 4 + 2 / 4) / 2)
    caps = ["A red circle.", "a red circle", "a blue square"]
    assert baselines.most_common_caption(caps) == "A red circle."
    train_q = [{"question_type": "how many", "answers": ["2"] * 6 + ["3"] * 4},
               {"question_type": "what color", "answers": ["red"] * 10}]
    assert baselines.answer_per_question_type(train_q) == {"how many": "2", "what color": "red"}
    val_q = [{"question_type": "how many", "answers": ANSWERS},
             {"question_type": "what color", "answers": ["blue"] * 10},
             # unseen type -> overall "red"
             {"question_type": "what shape", "answers": ["red"] * 10}]
    assert baselines.per_type_vqa_accuracy(train_q, val_q) == pytest.approx((0.9 + 0 + 1) / 3)
    assert baselines.majority_class_accuracy([0, 1, 1], [1, 0, 1, 1]) == 0.75


# ----------------------------------------------------------------------------- attributes / report
def test_attribute_accuracy_hand_computed():
    from jetformer.eval.attributes import attribute_accuracy, class_asked, t2i_asked

    scene = {"objects": [{"shape": "circle", "color": "red", "size": "large", "position": "left"},
                         {"shape": "cross", "color": "blue", "size": "small",
                          "position": "top left"}],
             "count": 2, "background": "plain black"}
    assert t2i_asked(scene) == {"shape": "circle", "color": "red"}  # the main object, not the extra
    assert t2i_asked({}) == {}
    assert (class_asked(2, ["circle", "cross", "square"], {"shape": [], "color": []})
            == {"shape": "square"})
    assert class_asked(2, ["n01", "n02", "n03"], {"label": []}) == {"label": "2"}
    judged = {"shape": ["circle", "square", "cross"], "color": ["red", "red", "blue"]}
    asked = [{"shape": "circle", "color": "red"}, {"shape": "circle", "color": "red"}, {}]
    acc, per = attribute_accuracy(judged, asked)
    assert per == [1.0, 0.5, None]
    assert acc == pytest.approx(0.75)


def test_merge_results_and_csv(tmp_path):
    from jetformer.eval.report import REQUIRED_KEYS, merge_results, read_json, write_csv, write_json

    merged = merge_results({"a": {"fid": 1.5, "details": {"x": 1}},
                            "b": {"cider": 2.0, "fid": 1.5}})
    assert merged["fid"] == 1.5 and merged["cider"] == 2.0 and "details" not in merged
    assert set(REQUIRED_KEYS) <= set(merged) and merged["vqa_accuracy"] is None
    with pytest.raises(ValueError, match="differs between stages"):
        merge_results({"a": {"fid": 1.0}, "b": {"fid": 2.0}})
    write_json(tmp_path / "m.json", {"x": float("nan"), "y": 1})
    assert read_json(tmp_path / "m.json") == {"x": None, "y": 1}
    write_csv(tmp_path / "e.csv", [], fields=["index", "cider"])
    assert (tmp_path / "e.csv").read_text().strip() == "index,cider"
    write_csv(tmp_path / "r.csv", [{"index": 0, "p": "a, b"}, {"index": 1, "q": None}])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["index,p,q", '0,"a, b",', "1,,"]
