"""Generation prompts match the training format, and sampling respects modality and length."""

import numpy as np
import pytest
import torch

from model.cm3.format import image_to_text_prompt, mask_spans, text_to_image_prompt
from model.document import EOS, IMG_OPEN, IMG_SRC, INFILL, Vocab
from model.transformer import Transformer, TransformerConfig
from pipelines.inference.sampling import (
    caption_nll,
    close_image,
    generate_captions,
    generate_images,
)
from pipelines.training.sequences import assemble

VOCAB = Vocab(n_text=20, n_image=16)
CAP, CODES = [3, 7, 1], list(range(16))


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=VOCAB.size, n_layer=1, n_head=2, d_model=32)).eval()


def context_docs() -> list[np.ndarray]:
    return [np.asarray(VOCAB.encode([1, 2], [5] * 16)), np.asarray(VOCAB.encode([4], [6] * 16))]


def test_text_to_image_prompt_is_the_training_prefix():
    ctx = context_docs()
    ids, pos = text_to_image_prompt(VOCAB, CAP, ctx)
    unit = assemble(ctx, np.asarray(VOCAB.encode(CAP, CODES)), alpha=0.1)
    n = len(ids)
    assert ids == unit.ids[:n].tolist() and pos == unit.positions[:n].tolist()
    assert ids[-1] == IMG_SRC and pos[-(len(CAP) + 2)] == 0  # the main document restarts at 0


def test_image_to_text_prompt_is_the_masked_training_prefix():
    ctx = context_docs()
    ids, pos = image_to_text_prompt(VOCAB, CODES, ctx)
    doc = np.asarray(VOCAB.encode(CAP, CODES))
    masked = mask_spans(doc, [(0, len(CAP))], VOCAB)  # the caption as span 0 (§3.1)
    unit = assemble(ctx, masked, alpha=0.1)
    n = len(ids)
    assert ids == unit.ids[:n].tolist() and pos == unit.positions[:n].tolist()
    assert ids[-2:] == [INFILL, VOCAB.mask(0)]
    rest = unit.ids[n:].tolist()
    assert rest == [c + VOCAB.text_offset for c in CAP] + [EOS]  # what the model learns to emit


def test_text_to_image_samples_exactly_grid_squared_image_codes(model):
    codes = generate_images(model, VOCAB, CAP, grid=4, n=3, context=context_docs(),
                            generator=torch.Generator().manual_seed(0))
    assert codes.shape == (3, 16)
    assert codes.min() >= 0 and codes.max() < VOCAB.n_image
    doc = close_image(VOCAB, CAP, codes[0])
    assert VOCAB.decode(doc) == (CAP, codes[0].tolist())


def test_image_to_text_samples_only_text_ids(model):
    caps = generate_captions(model, VOCAB, CODES, m=5, max_tokens=6, context=context_docs(),
                             generator=torch.Generator().manual_seed(1))
    assert len(caps) == 5
    assert all(len(c) <= 6 and all(0 <= x < VOCAB.n_text for x in c) for c in caps)
    assert any(caps)


def test_caption_nll_matches_a_plain_forward_and_empty_is_inf(model):
    ctx = context_docs()
    nll = caption_nll(model, VOCAB, CODES, [CAP, [], [2]], ctx)
    assert nll[1] == float("inf") and np.isfinite(nll[0]) and np.isfinite(nll[2])
    ids, pos = image_to_text_prompt(VOCAB, CODES, ctx)
    full = ids + [c + VOCAB.text_offset for c in CAP] + [EOS]
    positions = pos + list(range(pos[-1] + 1, pos[-1] + 1 + len(CAP) + 1))
    with torch.no_grad():
        logits, _ = model(torch.tensor([full[:-1]]), torch.tensor([positions[:-1]]))
    logp = logits[0].log_softmax(-1)
    want = -np.mean([float(logp[i - 1, full[i]]) for i in range(len(ids), len(full))])
    assert nll[0] == pytest.approx(want, rel=1e-4)


def test_prompt_without_context_starts_at_the_document():
    ids, pos = text_to_image_prompt(VOCAB, CAP)
    # the prompt ends at `" src="`, where positions restart for the image tokens
    assert ids[0] == IMG_OPEN and pos == [*range(len(ids) - 1), 0]
