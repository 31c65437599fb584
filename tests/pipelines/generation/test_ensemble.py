"""Ensembles over retrieved documents (Table 6): one pass equals plain scoring, passes split the
top k, and the mixture is a proper combination of the passes."""

import math

import numpy as np
import pytest
import torch

from model.document import Vocab
from model.transformer import Transformer, TransformerConfig
from pipelines.generation.ensemble import (
    IMAGE,
    TEXT,
    combine,
    ensemble_images,
    ensemble_nll,
    ensemble_perplexity,
    main_logprobs,
    passes,
)
from pipelines.inference.scoring import scored_nll

VOCAB = Vocab(n_text=20, n_image=16)
MAIN = np.asarray(VOCAB.encode([3, 7, 1], list(range(16))))
DOCS = [np.asarray(VOCAB.encode([i + 1], [(i * 3 + j) % 16 for j in range(16)])) for i in range(5)]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=VOCAB.size, n_layer=1, n_head=2, d_model=32)).eval()


def test_passes_split_the_top_k():
    assert passes(DOCS, 4, 2) == [DOCS[0:2], DOCS[2:4]]
    assert passes(DOCS, 5, 2) == [DOCS[0:2], DOCS[2:4], DOCS[4:5]]
    assert passes(DOCS, 1, 2) == [DOCS[0:1]] and passes(DOCS, 0) == [[]]


@pytest.mark.parametrize("modality", [IMAGE, TEXT])
def test_one_pass_equals_plain_scoring(model, modality):
    for k in (0, 1, 2):
        got = ensemble_nll(model, VOCAB, MAIN, DOCS, k, per_pass=2, modality=modality)
        want = scored_nll(model, [*DOCS[:k], MAIN], VOCAB, modality)
        assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)


def test_mixture_of_passes_is_the_mean_probability(model):
    a = main_logprobs(model, DOCS[0:2], MAIN)
    b = main_logprobs(model, DOCS[2:4], MAIN)
    mixed = combine(torch.stack([a, b]), "prob")
    assert torch.allclose(mixed.exp(), (a.exp() + b.exp()) / 2, atol=1e-6)
    geo = combine(torch.stack([a, b]), "logprob")
    assert torch.allclose(geo.exp().sum(-1), torch.ones(len(a)), atol=1e-5)
    nll, n = ensemble_nll(model, VOCAB, MAIN, DOCS, 4, per_pass=2)
    assert n == 16
    # Jensen: -log of the mean probability <= the mean of the passes' -log probabilities
    singles = [ensemble_nll(model, VOCAB, MAIN, DOCS[i:i + 2], 2)[0] for i in (0, 2)]
    assert nll <= sum(singles) / 2 + 1e-4 and nll != pytest.approx(singles[0])
    ppl = ensemble_perplexity(model, VOCAB, [MAIN], [DOCS], 4)
    assert ppl == pytest.approx(math.exp(nll / n))
    with pytest.raises(ValueError):
        combine(torch.stack([a, b]), "vote")


def test_ensemble_sampling_yields_image_codes(model):
    codes = ensemble_images(model, VOCAB, [3, 7, 1], 4, 3, DOCS, k=4,
                            generator=torch.Generator().manual_seed(0))
    assert codes.shape == (3, 16) and codes.min() >= 0 and codes.max() < 16
