"""The CM3 document format: `<img alt="caption" src="image tokens">` as one id sequence (paper §3.1)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD, EOS, INFILL, IMG_OPEN, IMG_SRC, IMG_CLOSE = 0, 1, 2, 3, 4, 5
FIRST_SENTINEL = 6
SPECIAL_NAMES = ("<pad>", "<eos>", "<infill>", '<img alt="', '" src="', '">')
LAYOUT_VERSION = "cm3-doc-v1"  # bump when the id layout or the document grammar changes

SPECIAL, TEXT, IMAGE = 0, 1, 2  # modality codes returned by Vocab.modality


class DocumentError(ValueError):
    """An id sequence that is not a well-formed CM3 document."""


@dataclass(frozen=True)
class Vocab:
    """One id space: specials, then CM3 mask sentinels, then text BPE ids, then image codes.

    Ids: 0 <pad>, 1 <eos> (end of document / separator), 2 <infill>, 3 `<img alt="`,
    4 `" src="`, 5 `">`, 6..6+n_sentinels-1 <mask:i>, then text (text_offset), then image
    (image_offset).
    """

    n_text: int  # text BPE vocabulary size
    n_image: int  # VQGAN codebook size
    n_sentinels: int = 8  # CM3 mask sentinels <mask:0>..<mask:n-1>

    def __post_init__(self) -> None:
        for name in ("n_text", "n_image", "n_sentinels"):
            if getattr(self, name) < (0 if name == "n_sentinels" else 1):
                raise ValueError(f"Vocab.{name} must be positive, got {getattr(self, name)}")

    @property
    def text_offset(self) -> int:
        return FIRST_SENTINEL + self.n_sentinels

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.n_text

    @property
    def size(self) -> int:
        return self.image_offset + self.n_image

    def mask(self, i: int) -> int:
        """Id of the sentinel <mask:i>."""
        if not 0 <= i < self.n_sentinels:
            raise ValueError(f"sentinel {i} out of range: this vocab has {self.n_sentinels}")
        return FIRST_SENTINEL + i

    def encode(self, caption_ids: Sequence[int] | None,
               image_codes: Sequence[int] | None) -> list[int]:
        """Raw text ids and raw codebook indices -> one document's ids, ending with <eos>."""
        caption = _as_list(caption_ids)
        image = _as_list(image_codes)
        if not caption and not image:
            raise DocumentError("a document needs a caption, an image or both; got neither")
        _check_range(caption, self.n_text, "caption id", "text vocabulary")
        _check_range(image, self.n_image, "image code", "codebook")
        t, i = self.text_offset, self.image_offset
        return [IMG_OPEN, *(c + t for c in caption), IMG_SRC, *(c + i for c in image),
                IMG_CLOSE, EOS]

    def decode(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """One document's ids -> (raw caption ids, raw image codes); the inverse of `encode`."""
        ids = [int(x) for x in ids]
        if len(ids) < 4 or ids[0] != IMG_OPEN or ids[-2:] != [IMG_CLOSE, EOS]:
            raise DocumentError(f"not a document: expected `{SPECIAL_NAMES[IMG_OPEN]}` ... "
                                f"`{SPECIAL_NAMES[IMG_CLOSE]}` <eos>, got {ids[:4]}...{ids[-2:]}")
        body = ids[1:-2]
        if body.count(IMG_SRC) != 1:
            raise DocumentError(f"a document has exactly one `\" src=\"`, found {body.count(IMG_SRC)}")
        split = body.index(IMG_SRC)
        caption, image = body[:split], body[split + 1:]
        if not self._all_in(caption, TEXT) or not self._all_in(image, IMAGE):
            raise DocumentError("caption holds non-text ids or image holds non-image ids")
        return [c - self.text_offset for c in caption], [c - self.image_offset for c in image]

    def modality(self, ids: np.ndarray) -> np.ndarray:
        """Per-id modality (0 special, 1 text, 2 image), same shape, for per-modality losses."""
        ids = np.asarray(ids)
        out = np.zeros(ids.shape, dtype=np.int8)
        out[(ids >= self.text_offset) & (ids < self.image_offset)] = TEXT
        out[(ids >= self.image_offset) & (ids < self.size)] = IMAGE
        return out

    def token_name(self, i: int) -> str:
        """Readable name of an id, for debugging printouts."""
        if i < FIRST_SENTINEL:
            return SPECIAL_NAMES[i]
        if i < self.text_offset:
            return f"<mask:{i - FIRST_SENTINEL}>"
        if i < self.image_offset:
            return f"<t{i - self.text_offset}>"
        return f"<i{i - self.image_offset}>"

    def fingerprint(self) -> str:
        key = f"{LAYOUT_VERSION}:{self.n_text}:{self.n_image}:{self.n_sentinels}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _all_in(self, ids: list[int], modality: int) -> bool:
        return bool(np.all(self.modality(np.asarray(ids, dtype=np.int64)) == modality))


def _as_list(ids: Sequence[int] | None) -> list[int]:
    return [] if ids is None else [int(x) for x in ids]


def _check_range(ids: list[int], n: int, what: str, space: str) -> None:
    bad = [x for x in ids if not 0 <= x < n]
    if bad:
        raise DocumentError(f"{what} {bad[0]} outside the {space} of size {n}")


def positions(doc: Sequence[int] | np.ndarray) -> np.ndarray:
    """Position of each token of one document: 0 at the document start, and 0 again at its
    `" src="` marker, so image token i sits at position i + 1 whatever the caption's length.

    Retrieved renderings of an entity then put each image token at the same position as the
    main document's, and rotary attention can copy it by relative position 0; with positions
    counted from the document start they would shift with every caption length.
    """
    ids = np.asarray(doc)
    idx = np.arange(len(ids))
    start = np.maximum.accumulate(np.where(ids == IMG_SRC, idx, 0)) if len(ids) else idx
    return (idx - start).astype(np.int64)


def sequence_positions(docs: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    """`positions` of consecutive documents, restarting in each."""
    parts = [positions(d) for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
