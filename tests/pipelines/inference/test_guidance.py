"""Guided decoding: the branches drop the caption / the documents, weight 0 is the unguided model,
and training's caption dropout makes the unconditional branch's document."""

import numpy as np
import pytest
import torch

from model.cm3.format import text_to_image_prompt
from model.document import IMG_OPEN, IMG_SRC, Vocab
from model.transformer import Transformer, TransformerConfig
from pipelines.inference.guidance import Guidance, guidance_branches, guided_images
from pipelines.inference.sampling import generate_images
from pipelines.training.sequences import AssemblyConfig, maybe_drop_caption

VOCAB = Vocab(n_text=20, n_image=16)
CAP = [3, 7, 1]
CTX = [np.asarray(VOCAB.encode([1, 2], [5] * 16))]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=VOCAB.size, n_layer=1, n_head=2, d_model=32)).eval()


def test_branches_drop_the_caption_and_the_documents():
    branches, weights = guidance_branches(VOCAB, CAP, CTX, Guidance(caption=2.0, documents=1.0))
    assert weights == [2.0, 1.0]
    assert branches[0] == text_to_image_prompt(VOCAB, CAP, CTX)
    no_cap, no_docs = branches[1][0], branches[2][0]
    assert no_cap[-2:] == [IMG_OPEN, IMG_SRC] and no_cap[: len(CTX[0])] == CTX[0].tolist()
    assert no_docs == text_to_image_prompt(VOCAB, CAP)[0]
    assert guidance_branches(VOCAB, CAP, (), Guidance(documents=1.0))[1] == []  # nothing to drop


def test_weight_zero_is_plain_sampling_and_a_weight_changes_it(model):
    def run(g):
        return guided_images(model, VOCAB, CAP, 4, 3, CTX, g, generator=torch.Generator().manual_seed(0))
    plain = generate_images(model, VOCAB, CAP, 4, 3, CTX, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(run(Guidance()), plain)
    guided = run(Guidance(caption=5.0, documents=2.0))
    assert guided.shape == (3, 16) and guided.min() >= 0 and guided.max() < 16
    assert not np.array_equal(guided, plain)


def test_caption_dropout_makes_the_unconditional_document():
    doc = np.asarray(VOCAB.encode(CAP, list(range(16))))
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    assert maybe_drop_caption(rng, doc, AssemblyConfig()) is doc
    assert rng.bit_generator.state == before  # rate 0 draws nothing: same data order as before
    dropped = maybe_drop_caption(rng, doc, AssemblyConfig(caption_dropout=0.999999))
    assert VOCAB.decode(dropped.tolist()) == ([], list(range(16)))
