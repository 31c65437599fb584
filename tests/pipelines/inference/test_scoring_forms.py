"""Caption perplexity in the infilling form (image first) vs caption first; logits only at the
scored positions give the same numbers as a full forward; reranking scores = generate.caption_nll."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.cm3.format import caption_infilling_form, image_to_text_prompt
from model.document import EOS, IMG_SRC, INFILL, Vocab, sequence_positions
from model.transformer import Transformer, preset
from pipelines.inference.sampling import caption_nll
from pipelines.inference.scoring import HeldOutExample, example_nll, scored_nll

VOCAB = Vocab(n_text=20, n_image=16)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("demo", VOCAB.size, n_layer=2, d_model=32, n_head=2)).eval()


def full_nll(model: Transformer, docs: list, modality: int) -> tuple[float, int]:
    """The reference: a whole-sequence forward and every logit."""
    ids = torch.tensor(np.concatenate(docs))[None]
    pos = torch.tensor(sequence_positions(docs))[None]
    logits, _ = model(ids[:, :-1], pos[:, :-1])
    nll = F.cross_entropy(logits[0], ids[0, 1:], reduction="none")
    sel = np.zeros(ids.shape[1], bool)
    sel[ids.shape[1] - len(docs[-1]):] = VOCAB.modality(np.asarray(docs[-1])) == modality
    m = torch.from_numpy(sel[1:])
    return float(nll[m].sum()), int(m.sum())


def test_infilling_form_puts_the_image_before_the_caption_as_generation_does():
    doc = VOCAB.encode([3, 4, 5], list(range(9)))
    inf = caption_infilling_form(VOCAB, doc)
    prompt, _ = image_to_text_prompt(VOCAB, list(range(9)))
    assert inf[:len(prompt)] == prompt and inf[len(prompt):-1] == [c + VOCAB.text_offset for c in (3, 4, 5)]
    assert inf.index(INFILL) > inf.index(IMG_SRC)  # the image comes first


def test_both_forms_score_the_same_caption_tokens_and_differ(model):
    main = VOCAB.encode([3, 4, 5, 6], list(range(9)))
    ctx = [VOCAB.encode([7, 8], list(range(3, 12)))]
    ex = HeldOutExample(main, by_caption=ctx, by_image=ctx)
    infill = example_nll(model, VOCAB, ex, True, 2, "infill")
    first = example_nll(model, VOCAB, ex, True, 2, "first")
    assert infill["text"][1] == first["text"][1] == 4 and infill["image"] == first["image"]
    assert infill["text"][0] != pytest.approx(first["text"][0])
    for docs, modality in (([*ctx, main], 1), ([*ctx, main], 2), ([*ctx, caption_infilling_form(VOCAB, main)], 1)):
        got, want = scored_nll(model, docs, VOCAB, modality), full_nll(model, docs, modality)
        assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)
    with pytest.raises(ValueError, match="text_form"):
        example_nll(model, VOCAB, ex, True, 2, "sideways")


def test_rerank_scores_only_at_caption_positions_equal_a_full_forward(model):
    """caption_nll runs the head at caption positions only; padded, mixed-length rows must score
    exactly as one full forward per caption would."""
    codes, caps = list(range(9)), [[3, 4], [5], [], [6, 7, 8]]
    ctx = [np.asarray(VOCAB.encode([1, 2], list(range(2, 11))))]
    got = caption_nll(model, VOCAB, codes, caps, ctx)
    ids, pos = image_to_text_prompt(VOCAB, codes, ctx)
    want = []
    for cap in caps:
        full = ids + [c + VOCAB.text_offset for c in cap] + [EOS]
        p = pos + list(range(pos[-1] + 1, pos[-1] + 1 + len(cap) + 1))
        with torch.no_grad():
            logp = model(torch.tensor([full[:-1]]), torch.tensor([p[:-1]]))[0][0].log_softmax(-1)
        want.append(float("inf") if not cap else
                    -np.mean([float(logp[i - 1, full[i]]) for i in range(len(ids), len(full))]))
    assert got[2] == want[2] == float("inf")
    assert np.allclose([g for g in got if g != float("inf")], [w for w in want if w != float("inf")],
                       rtol=1e-5)
