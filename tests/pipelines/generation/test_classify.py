"""Few-shot classification (§5.4): the k-pass ensemble averages label probabilities, and a tiny
model trained on a trivially separable toy set classifies it right, zero- and few-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.cm3.format import mask_spans
from model.document import Vocab, sequence_positions
from model.transformer import Transformer, TransformerConfig
from pipelines.generation.classify import classify, ensemble, label_logprobs, pass_probs
from pipelines.generation.fewshot import FewShotConfig, format_table

VOCAB = Vocab(n_text=8, n_image=8)
STEPS = 200
CLASSES = {0: ([2], [1, 1, 2, 1]), 1: ([5], [6, 6, 5, 6])}  # label caption, image codes


def toy_doc(c: int, rng: np.random.Generator) -> np.ndarray:
    cap, codes = CLASSES[c]
    noisy = [x if rng.random() > 0.2 else int(rng.integers(8)) for x in codes]
    return np.asarray(VOCAB.encode(cap, noisy))


def toy_sequence(rng: np.random.Generator) -> list[np.ndarray]:
    """0-2 demonstration documents, then a query with its caption masked (CM3 infilling form)."""
    docs = [toy_doc(int(rng.integers(2)), rng) for _ in range(int(rng.integers(3)))]
    main = toy_doc(int(rng.integers(2)), rng)
    return [*docs, mask_spans(main, [(0, 1)], VOCAB)]


@pytest.fixture(scope="module")
def toy_model() -> Transformer:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Transformer(TransformerConfig(vocab_size=VOCAB.size, n_layer=2, n_head=2, d_model=32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        seqs = [toy_sequence(rng) for _ in range(16)]
        width = max(sum(map(len, s)) for s in seqs)
        ids = torch.zeros(16, width, dtype=torch.long)
        pos = torch.zeros(16, width, dtype=torch.long)
        for r, s in enumerate(seqs):
            flat = np.concatenate(s)
            ids[r, : len(flat)], pos[r, : len(flat)] = torch.from_numpy(flat), torch.from_numpy(sequence_positions(s))
        logits, _ = model(ids[:, :-1], pos[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def test_ensemble_averages_the_first_k_passes():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8], [0.5, 0.5]])
    assert np.allclose(ensemble(probs, 1), [0.9, 0.1])
    assert np.allclose(ensemble(probs, 2), [0.55, 0.45])
    assert np.allclose(ensemble(probs, 4), [0.45, 0.55])
    assert np.allclose(ensemble(probs[:1], 0), [0.9, 0.1])


def test_toy_set_is_classified_right_with_and_without_demonstrations(toy_model):
    rng = np.random.default_rng(1)
    labels = [CLASSES[0][0], CLASSES[1][0]]
    for truth in (0, 1):
        query = CLASSES[truth][1]
        assert classify(toy_model, VOCAB, query, labels, []) == truth
        passes = [[toy_doc(0, rng), toy_doc(1, rng)] for _ in range(3)]
        assert classify(toy_model, VOCAB, query, labels, passes) == truth
        probs = pass_probs(toy_model, VOCAB, query, labels, passes)
        assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1)
        assert probs[:, truth].min() > 0.5


def test_label_logprobs_sum_over_the_label_and_its_eos(toy_model):
    lp = label_logprobs(toy_model, VOCAB, CLASSES[0][1], [[2], [2, 3]])
    assert lp.shape == (2,) and (lp < 0).all() and lp[1] < lp[0]  # a longer caption costs more here


def test_table_lists_every_model_label_kind_and_k():
    result = {"ks": [0, 1], "queries": 4, "tasks": 2, "split": "s.json",
              "accuracy": {"ra-cm3": {"semantic": {0: 0.5, 1: 1.0}, "non-semantic": {0: 0.5, 1: 0.75}}}}
    table = format_table(result)
    assert "| ra-cm3 | non-semantic | 0.50 | 0.75 |" in table
    with pytest.raises(ValueError):
        FewShotConfig(ks=())
