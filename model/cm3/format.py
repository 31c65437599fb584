"""CM3 sequences (paper §3.1, §3.3): retrieved documents m1..mK before the main document x, the
causal-masking (infilling) form, and the two prompts generation continues.

Every sequence is a list of documents; positions restart in each document (`sequence_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.document import EOS, IMG_OPEN, IMG_SRC, INFILL, Vocab, sequence_positions

Doc = Sequence[int] | np.ndarray  # one encoded document (Vocab.encode), list or array
Span = tuple[int, int]  # [start, end) inside a document's body (without `<img alt="` and <eos>)


def mask_spans(doc: np.ndarray, spans: list[Span], vocab: Vocab) -> np.ndarray:
    """CM3 infilling form of one document (spans index the document without its leading
    `<img alt="` and trailing <eos>): spans become <mask:i>, and `<infill> <mask:0> span0 ...
    <eos>` follows, so the model learns to fill them in from both sides (§3.1)."""
    body = doc[1:-1]  # spans never touch the document's first token or its <eos>
    kept, tail, last = [doc[:1]], [np.array([INFILL])], 0
    for i, (s, e) in enumerate(spans):
        kept += [body[last:s], np.array([vocab.mask(i)])]
        tail += [np.array([vocab.mask(i)]), body[s:e]]
        last = e
    kept.append(body[last:])
    return np.concatenate(kept + tail + [np.array([EOS])]).astype(doc.dtype)


def infilling_prompt(doc: np.ndarray, span: Span, vocab: Vocab) -> np.ndarray:
    """The infilling form of `doc` with one masked span, cut after `<infill> <mask:0>`: what the
    model continues with the span's tokens."""
    masked = mask_spans(doc, [span], vocab)
    return masked[: int(np.flatnonzero(masked == INFILL)[0]) + 2]


def caption_infilling_form(vocab: Vocab, doc: Doc) -> list[int]:
    """A document with its caption as span 0: `<img alt="` <mask:0> `" src="` image `">`
    <infill> <mask:0> caption <eos> (image first; scores captions as image->caption uses them)."""
    caption, _ = vocab.decode(list(doc))
    return mask_spans(np.asarray(doc, dtype=np.int64), [(0, len(caption))], vocab).tolist()


def with_context(context: Sequence[Doc], main: Sequence[int]) -> tuple[list[int], list[int]]:
    """(ids, positions) of m1..mK followed by the main document (or its prefix); positions
    restart per document, as in training."""
    docs = [[int(x) for x in d] for d in context] + [[int(x) for x in main]]
    return [x for d in docs for x in d], sequence_positions(docs).tolist()


def text_to_image_prompt(vocab: Vocab, caption_ids: Sequence[int],
                         context: Sequence[Doc] = ()) -> tuple[list[int], list[int]]:
    """m1..mK then `<img alt="` caption `" src="`: the model continues with image codes."""
    main = [IMG_OPEN, *(int(c) + vocab.text_offset for c in caption_ids), IMG_SRC]
    return with_context(context, main)


def image_to_text_prompt(vocab: Vocab, image_codes: Sequence[int],
                         context: Sequence[Doc] = ()) -> tuple[list[int], list[int]]:
    """m1..mK then the main document with its (empty) caption as span 0, in infilling form:
    `<img alt="` <mask:0> `" src="` image `">` <infill> <mask:0>; the model fills in the caption
    and ends it with <eos>."""
    doc = np.asarray(vocab.encode([], image_codes), dtype=np.int64)
    return with_context(context, infilling_prompt(doc, (0, 0), vocab).tolist())
