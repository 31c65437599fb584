"""Infilling (§5.2): the prompt is the training's masked form, and every code outside the box is kept."""

import numpy as np
import pytest
import torch

from model.cm3.format import mask_spans
from model.document import INFILL, Vocab
from model.transformer import Transformer, TransformerConfig
from pipelines.generation.infill import Box, infill_images, infill_prompt
from pipelines.training.sequences import assemble

VOCAB = Vocab(n_text=20, n_image=16)
GRID, CAP = 4, [3, 7, 1]
CODES = [(5 * i + 2) % 16 for i in range(GRID * GRID)]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=VOCAB.size, n_layer=1, n_head=2, d_model=32)).eval()


def test_box_parse_and_checks():
    box = Box.parse("1,1,3,4")
    assert box == Box(1, 1, 3, 4) and box.span(GRID) == (5, 15)
    assert box.inside(GRID).reshape(GRID, GRID)[1:4, 1:3].all() and box.inside(GRID).sum() == 6
    for bad in ("1,1,1,3", "0,0,5,2", "a,b,c,d", "1,2,3"):
        with pytest.raises(ValueError):
            b = Box.parse(bad)
            b.check(GRID)


def test_prompt_is_the_masked_training_prefix():
    ctx = [np.asarray(VOCAB.encode([1], [4] * 16))]
    box = Box(1, 1, 3, 4)
    ids, pos, forced = infill_prompt(VOCAB, CAP, CODES, GRID, box, ctx)
    doc = np.asarray(VOCAB.encode(CAP, CODES))
    s, e = box.span(GRID)
    offset = len(CAP) + 1
    unit = assemble(ctx, mask_spans(doc, [(offset + s, offset + e)], VOCAB), alpha=0.1)
    assert ids == unit.ids[: len(ids)].tolist() and pos == unit.positions[: len(ids)].tolist()
    assert ids[-2:] == [INFILL, VOCAB.mask(0)]
    # what training teaches the model to write next is the span; known cells are forced
    tail = unit.ids[len(ids):-1] - VOCAB.image_offset
    assert tail.tolist() == CODES[s:e]
    inside = box.inside(GRID)[s:e]
    assert all((f < 0) == bool(i) for f, i in zip(forced, inside, strict=True))


def test_infilled_image_keeps_every_unmasked_token(model):
    box = Box(1, 1, 3, 3)
    out = infill_images(model, VOCAB, CAP, CODES, GRID, box, n=6,
                        generator=torch.Generator().manual_seed(0))
    inside = box.inside(GRID)
    assert out.shape == (6, GRID * GRID)
    assert (out[:, ~inside] == np.asarray(CODES)[~inside]).all()
    assert (out >= 0).all() and (out < VOCAB.n_image).all()
    assert (out[:, inside] != np.asarray(CODES)[inside]).any()  # the box was really resampled
