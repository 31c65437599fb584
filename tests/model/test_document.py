"""The CM3 document format: ids <-> (caption, image) round trips and malformed input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.document import (
    EOS,
    IMG_CLOSE,
    IMG_OPEN,
    IMG_SRC,
    DocumentError,
    Vocab,
    positions,
    sequence_positions,
)

V = Vocab(n_text=100, n_image=64, n_sentinels=4)


def test_layout():
    assert V.text_offset == 10 and V.image_offset == 110 and V.size == 174
    assert V.mask(0) == 6 and V.mask(3) == 9
    with pytest.raises(ValueError):
        V.mask(4)


def test_full_document_ids():
    ids = V.encode([0, 5], [1, 63])
    assert ids == [IMG_OPEN, 10, 15, IMG_SRC, 111, 173, IMG_CLOSE, EOS]
    assert V.decode(ids) == ([0, 5], [1, 63])


@given(st.lists(st.integers(0, 99), max_size=20), st.lists(st.integers(0, 63), max_size=70))
def test_round_trip(caption, image):
    if not caption and not image:
        return
    ids = V.encode(caption, image)
    assert V.decode(ids) == (caption, image)
    mod = V.modality(np.array(ids))
    assert (mod == 1).sum() == len(caption) and (mod == 2).sum() == len(image)


def test_text_only_and_image_only():
    assert V.encode([3, 4], None) == [IMG_OPEN, 13, 14, IMG_SRC, IMG_CLOSE, EOS]
    assert V.decode(V.encode([3, 4], None)) == ([3, 4], [])
    assert V.encode(None, [2]) == [IMG_OPEN, IMG_SRC, 112, IMG_CLOSE, EOS]
    assert V.decode(V.encode(None, [2])) == ([], [2])


def test_refuses_bad_input():
    with pytest.raises(DocumentError, match="neither"):
        V.encode(None, [])
    with pytest.raises(DocumentError, match="codebook"):
        V.encode([1], [64])
    with pytest.raises(DocumentError, match="text vocabulary"):
        V.encode([100], [1])
    with pytest.raises(DocumentError):
        V.decode([IMG_OPEN, 10, IMG_CLOSE, EOS])  # no src marker
    with pytest.raises(DocumentError):
        V.decode([IMG_OPEN, 111, IMG_SRC, 10, IMG_CLOSE, EOS])  # modalities swapped


def test_modality_keeps_shape():
    ids = np.array([[0, 6, 10, 109], [110, 173, 1, 2]])
    assert V.modality(ids).tolist() == [[0, 0, 1, 1], [2, 2, 0, 0]]


def test_fingerprint_tracks_layout():
    assert V.fingerprint() == Vocab(100, 64, 4).fingerprint()
    assert V.fingerprint() != Vocab(100, 65, 4).fingerprint()


def test_small_bpe_round_trips_captions(tmp_path):
    from model.text_tokenizer import load_text_tokenizer, train_bpe

    caps = [f"a photo of the {n} on a grey background" for n in ("zorvik", "plenta", "quaro")] * 20
    tok = train_bpe(caps, 80, str(tmp_path / "bpe.json"))
    again = load_text_tokenizer(str(tmp_path / "bpe.json"))
    assert tok.vocab_size <= 80 and again.fingerprint() == tok.fingerprint()
    ids = again.encode("The Zorvik on a grey background")
    assert again.decode(ids) == "the zorvik on a grey background"  # lowercased, else exact
    assert max(ids) < again.vocab_size


def test_openclip_bpe_is_bundled():
    from model.text_tokenizer import load_text_tokenizer

    tok = load_text_tokenizer("openclip")
    assert tok.vocab_size == 49408
    assert tok.decode(tok.encode("a photo of the zorvik")) == "a photo of the zorvik"


def test_missing_bpe_file_names_it(tmp_path):
    from model.text_tokenizer import load_text_tokenizer

    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_text_tokenizer(str(tmp_path / "nope.json"))


def test_image_tokens_sit_at_the_same_positions_whatever_the_caption_length():
    v = Vocab(n_text=50, n_image=16)
    short, long = v.encode([1], [3, 4, 5, 6]), v.encode([1, 2, 3, 4, 5], [3, 4, 5, 6])
    img = lambda d: positions(d)[np.asarray(d) >= v.image_offset]  # noqa: E731
    assert img(short).tolist() == img(long).tolist() == [1, 2, 3, 4]
    assert positions(long)[0] == 0 and positions(long)[long.index(IMG_SRC)] == 0
    both = sequence_positions([short, long])
    assert both.tolist() == positions(short).tolist() + positions(long).tolist()
    text_only = v.encode([7, 8], None)
    assert positions(text_only).tolist() == [0, 1, 2, 0, 1, 2]
