"""CIDEr-D as in the COCO caption toolkit (pycocoevalcap `Cider`): tf-idf n-grams 1-4, clipping,
gaussian length penalty (sigma 6), document frequency from the references, scaled by 10."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

N, SIGMA = 4, 6.0
# What the toolkit's PTBTokenizer strips after lower-casing (its PUNCTUATIONS list).
_PUNCT = re.compile(r"''|'|``|`|-LRB-|-RRB-|-LCB-|-RCB-|[.?!,:\-;]")

Vec = list[dict[tuple[str, ...], float]]


def tokenize(caption: str) -> list[str]:
    """Lower-case words without punctuation: a Java-free stand-in for the toolkit's PTB tokenizer."""
    return _PUNCT.sub(" ", caption.lower()).split()


def ngrams(words: list[str], n: int = N) -> Counter:
    """Counts of every 1..n-gram (as word tuples)."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def document_frequency(refs: Sequence[Sequence[Counter]]) -> Counter:
    """For each n-gram, the number of images whose references contain it."""
    df: Counter = Counter()
    for image_refs in refs:
        df.update(set().union(*(set(r) for r in image_refs)))
    return df


def to_vec(counts: Counter, df: Counter, log_n_images: float) -> tuple[Vec, list[float], int]:
    """tf-idf vectors per n-gram order, their norms, and the length the toolkit uses.

    The toolkit's "length" counts the bigrams (its `n == 1` branch), not the words; the
    difference cancels in the length penalty except for one-word captions, so it is kept.
    """
    vec: Vec = [defaultdict(float) for _ in range(N)]
    norm = [0.0] * N
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        vec[n][gram] = tf * (log_n_images - math.log(max(1.0, df[gram])))
        norm[n] += vec[n][gram] ** 2
        if n == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def similarity(hyp: tuple[Vec, list[float], int], ref: tuple[Vec, list[float], int]) -> list[float]:
    """Per-order clipped cosine similarity times the gaussian length penalty."""
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    penalty = math.exp(-((lh - lr) ** 2) / (2 * SIGMA**2))
    out = []
    for n in range(N):
        val = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
        if nh[n] != 0 and nr[n] != 0:
            val /= nh[n] * nr[n]
        out.append(val * penalty)
    return out


def cider_d(candidates: Mapping[object, str],
            references: Mapping[object, Sequence[str]]) -> tuple[float, dict[object, float]]:
    """(corpus CIDEr-D, per-image scores) of one candidate caption per image vs its references.

    Document frequencies come from the references of exactly these images, as in the toolkit,
    so a score depends on the evaluated set. Raises on an empty set: no score from zero samples.
    """
    ids = list(candidates)
    if not ids:
        raise ValueError("CIDEr-D of zero captions is undefined; evaluate at least one image")
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"images {missing[:5]} have no reference captions")
    refs = [[ngrams(tokenize(r)) for r in references[i]] for i in ids]
    df = document_frequency(refs)
    log_n = math.log(float(len(ids)))
    scores = {}
    for i, image_refs in zip(ids, refs, strict=True):
        hyp = to_vec(ngrams(tokenize(candidates[i])), df, log_n)
        total = [0.0] * N
        for r in image_refs:
            total = [a + b for a, b in zip(total, similarity(hyp, to_vec(r, df, log_n)), strict=True)]
        scores[i] = sum(total) / N / len(image_refs) * 10.0
    return sum(scores.values()) / len(scores), scores
