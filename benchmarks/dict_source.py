"""A dict-backed DocSource for the benchmarks: documents and neighbour lists held as Python
objects, the in-memory peer that the memory-mapped token store is measured against (production
and tests read the store; this exists only to measure what the store saves)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.document import Vocab
from storage.fs import DataRoot


@dataclass
class DictSource:
    """Documents by key; neighbour lists by (query, variant)."""

    vocab: Vocab
    docs: dict[str, np.ndarray]
    neighbours: dict[str, dict[tuple[str, int], list[str]]] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._keys = sorted(self.docs)

    def n_items(self) -> int:
        return len(self._keys)

    def item(self, i: int) -> str:
        return self._keys[i]

    def doc(self, h: str) -> np.ndarray:
        return self.docs[h]

    def has_doc(self, h: str) -> bool:
        return h in self.docs

    def is_held(self, h: str) -> bool:
        return False

    def label(self, h: str) -> str:
        return h

    def neighbour_lists(self, h: str) -> dict[tuple[str, int], list[str]] | None:
        return self.neighbours.get(h)

    def longest(self) -> int:
        return max(len(d) for d in self.docs.values())


def load_dict_source(root: DataRoot) -> DictSource:
    """Every token and neighbour shard read into dicts (the path the store replaced)."""
    from pipelines.training.sequences import load_tokens
    from storage.manifest import list_manifests
    from storage.shards import read_table

    vocab, docs, lineage = load_tokens(root)
    neighbours: dict[str, dict[tuple[str, int], list[str]]] = {}
    for m in list_manifests(root, "retrieve"):
        t = read_table(root, root.artifact("retrieve", m.shard_id, "parquet"),
                       ["key", "query", "variant", "neighbor_keys"]).to_pydict()
        for k, q, v, nks in zip(t["key"], t["query"], t["variant"], t["neighbor_keys"], strict=True):
            neighbours.setdefault(k, {})[(q, int(v))] = list(nks)
    return DictSource(vocab, docs, neighbours, lineage)
