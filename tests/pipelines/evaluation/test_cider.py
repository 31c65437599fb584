"""CIDEr-D: hand-computed values on tiny examples, clipping, the length penalty, and (where it is
installed) agreement with the COCO caption toolkit's own scorer."""

import math
import random

import pytest

from pipelines.evaluation.cider import cider_d, tokenize


def test_hand_computed_exact_match_and_partial():
    # Two images, df of every n-gram = 1, log(N) = ln 2, so every idf weight is ln 2.
    # A: "a b" vs "a b": unigram and bigram cosines are 1, orders 3-4 are 0 -> (1+1)/4*10 = 5.
    # B: "c" vs "c d": unigram cosine ln2^2 / (ln2 * sqrt(2) ln2) = 1/sqrt(2); bigram 0; the
    #    length penalty uses bigram counts 0 vs 1 -> exp(-1/72). Score 10/4 * exp(-1/72)/sqrt(2).
    corpus, per = cider_d({"A": "a b", "B": "c"}, {"A": ["a b"], "B": ["c d"]})
    b = 2.5 * math.exp(-1 / 72) / math.sqrt(2)
    assert per["A"] == pytest.approx(5.0)
    assert per["B"] == pytest.approx(b)
    assert corpus == pytest.approx((5.0 + b) / 2)


def test_clipping_caps_repeated_words():
    # "a a" vs "a b": hyp unigram weight 2 ln2 is clipped to the reference's ln2:
    # ln2 * ln2 / (2 ln2 * sqrt(2) ln2) = 1 / (2 sqrt 2); no shared bigram; equal lengths.
    _, per = cider_d({"A": "a a", "B": "c d"}, {"A": ["a b"], "B": ["c d"]})
    assert per["A"] == pytest.approx(10 / 4 / (2 * math.sqrt(2)))


def test_ngrams_in_every_image_carry_no_weight_and_refs_average():
    # "the" appears in both images' references: idf = ln2 - ln2 = 0, so it earns nothing.
    _, per = cider_d({"A": "the", "B": "the cat"}, {"A": ["the dog", "the"], "B": ["the cat"]})
    assert per["A"] == 0.0
    assert per["B"] > 0


def test_tokenizer_drops_punctuation_and_case():
    assert tokenize("A Cat, on the MAT.") == ["a", "cat", "on", "the", "mat"]


def test_no_score_from_zero_captions():
    with pytest.raises(ValueError, match="zero captions"):
        cider_d({}, {})
    with pytest.raises(ValueError, match="no reference"):
        cider_d({"A": "x"}, {"A": []})


def test_agrees_with_pycocoevalcap():
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider",
                                    reason="pycocoevalcap not installed (pip install pycocoevalcap)")
    rng = random.Random(0)
    words = "a the cat dog sits on mat red blue big small runs near tree".split()
    refs = {i: [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(5)] for i in range(12)}
    cands = {i: " ".join(rng.choices(words, k=rng.randint(1, 9))) for i in range(12)}
    theirs, their_per = cider_mod.Cider().compute_score(refs, {i: [c] for i, c in cands.items()})
    ours, per = cider_d(cands, refs)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert [per[i] for i in range(12)] == pytest.approx(list(their_per), rel=1e-9)
