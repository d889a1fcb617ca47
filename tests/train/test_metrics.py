"""Task metrics on examples checked by hand."""

import math

import pytest

from ptpeft_kernels.train.metrics import (
    caption_scores,
    normalize_answer,
    ptb_tokenize,
    vqa_accuracy,
    vqa_scores,
)


def test_ptb_tokenize_lowercases_splits_clitics_and_drops_punctuation():
    assert ptb_tokenize("A Man's dog, isn't it?  Yes...") == "a man 's dog is n't it yes"
    assert ptb_tokenize("two shapes : a red circle top left .") == "two shapes a red circle top left"


def test_bleu4_by_hand():
    # hyp "a b c d e f" vs ref "a b c d x f": clipped precisions 5/6, 3/5, 2/4, 1/3, equal lengths (BP = 1):
    # BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25.
    s = caption_scores({1: "a b c d e f"}, {1: ["a b c d x f"]})
    assert s["BLEU-4"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-4)


def test_cider_d_by_hand():
    # Two images, one reference each, no n-gram shared between images: every n-gram has df = 1,
    # idf = log(2). An exact 2-word match has cosine 1 for unigrams and bigrams, 0 for 3/4-grams
    # (no such n-grams): mean 0.5, x10 = 5 per image, x100 = 500.
    refs = {1: ["a b"], 2: ["c d"]}
    assert caption_scores({1: "a b", 2: "c d"}, refs)["CIDEr"] == pytest.approx(500.0, abs=1e-6)
    # "a" for image 1: unigram cosine (log2 * log2) / (log2 * sqrt(2) log2) = 1/sqrt(2), no bigram;
    # CIDEr-D's length counts bigrams (0 vs 1): penalty exp(-1 / (2 * 6^2)).
    # Image 1: 10 * (1/sqrt(2)) * exp(-1/72) / 4; image 2: 5.
    img1 = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    expected = 100 * (img1 + 5) / 2
    assert caption_scores({1: "a", 2: "c d"}, refs)["CIDEr"] == pytest.approx(expected, abs=1e-6)


def test_caption_scores_bad_input():
    with pytest.raises(ValueError, match="differ in keys"):
        caption_scores({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores({1: "a"}, {1: "a"})


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two.", "2"),
        ("the dog", "dog"),
        ("dont", "don't"),
        ("yes!", "yes"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("red, blue", "red blue"),
        ("a (big) cat", "big cat"),
        ("left/right", "left right"),
        ("  TOP Left \n", "top left"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize(
    "pred, answers, acc",
    [
        ("2", ["2"] * 10, 1.0),
        ("2", ["2"] * 4 + ["3"] * 6, 1.0),  # every leave-one-out subset keeps >= 3 matches
        ("2", ["2"] * 3 + ["3"] * 7, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        ("2", ["2"] * 2 + ["3"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("2", ["2"] + ["3"] * 9, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        ("two", ["2"] * 10, 1.0),  # number words become digits
        ("The Dog.", ["dog"] * 10, 1.0),
        ("yes", ["no"] * 10, 0.0),
    ],
)
def test_vqa_accuracy_by_hand(pred, answers, acc):
    assert vqa_accuracy(pred, answers) == pytest.approx(acc)


def test_vqa_scores_mean_percent_and_bad_input():
    s = vqa_scores({1: "2", 2: "no"}, {1: ["2"] * 10, 2: ["yes"] * 10})
    assert s["VQA-acc"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("a", [])
    with pytest.raises(ValueError, match="differ"):
        vqa_scores({1: "a"}, {2: ["a"]})
