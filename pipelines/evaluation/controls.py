"""Controls that isolate retrieval (Table 5, issue 19): instead of the retrieved documents, put in
context random memory documents, or *oracle* ones (demo data only: memory documents naming the
query's entity, never its own document nor a near-duplicate the leakage guard excludes). The
oracle row is the ceiling of what the generator can get from retrieval."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

CONTEXTS = ("retrieved", "oracle", "random")


def random_keys(keys: list[str], position: int, k: int, excluded: set[str], salt: int) -> list[str]:
    """k of the sorted memory `keys` drawn at random (seeded by the image's position): the
    relevance ablation."""
    rng = np.random.default_rng([position, salt])
    picks = [keys[int(i)] for i in rng.permutation(len(keys))[:k + len(excluded)]]
    return [x for x in picks if x not in excluded][:k]


def words(caption: str) -> set[str]:
    """The caption's words, lower-cased, without punctuation ("{name}, {bg} backdrop" has a
    comma; a sampled caption may end in a full stop)."""
    return set(re.findall(r"[^\s,.;:!?\"']+", caption.lower()))


def names_entity(caption: str, entity: str) -> bool:
    """Whether a caption names the demo entity as a word ("zozo" is not named by "dopzozo")."""
    return entity.lower() in words(caption)


class EntityDocs:
    """Memory documents by the entity their caption names (demo captions name it as a word, so
    "zozo" never matches "dopzozo"), and each document's image sha256 (the query's own document)."""

    def __init__(self, captions: Mapping[str, str], sha256: Mapping[str, str]):
        self.by_word: dict[str, list[str]] = {}
        for key in sorted(captions):
            for w in words(captions[key]):
                self.by_word.setdefault(w, []).append(key)
        self.sha256 = dict(sha256)

    def oracle(self, entity: str, own_sha256: str, position: int, k: int,
               excluded: set[str], salt: int = 0) -> list[str]:
        """Up to k memory documents naming `entity`, drawn in a seeded order (by the image's
        position); never one whose image is the query's (same sha256) nor one in `excluded`."""
        pool = [key for key in self.by_word.get(entity.lower(), [])
                if key not in excluded and not (own_sha256 and self.sha256.get(key) == own_sha256)]
        rng = np.random.default_rng([position, salt, 7])
        return [pool[int(i)] for i in rng.permutation(len(pool))[:k]]


def caption_entity_rate(images: list[dict[str, Any]], model: str) -> np.ndarray:
    """Per evaluation image, 1.0 where `model`'s generated caption names the image's entity, 0.0
    where it does not, NaN where the image has no entity (off the demo) or no such caption."""
    return np.array([float(r["caption_entity"][model]) if model in r.get("caption_entity", {})
                     else np.nan for r in images], np.float64)


def same_entity_rates(images: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """% of evaluation images (demo: those with an entity) whose context document at rank 1, or
    any of them, names the image's entity; per query (caption, image). Empty off the demo."""
    out: dict[str, dict[str, float]] = {}
    for query in ("caption", "image"):
        hits = [rec["same_entity"][query] for rec in images if rec.get("same_entity")]
        if hits:
            out[f"{query}_query"] = {
                "rank1": round(100.0 * float(np.mean([bool(h[:1]) and h[0] for h in hits])), 2),
                "any": round(100.0 * float(np.mean([any(h) for h in hits])), 2), "images": len(hits)}
    return out
