"""Adding new embedding shards to a built index: when it is allowed, the vectors added into a copy
of each built (sub-)index (no retraining, no rebuild), and the drift check on the new vectors."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipelines.retrieval.faiss_index import (
    ShardedIndex,
    local_file,
    part_suffixes,
    search_ties_by_id,
)
from pipelines.retrieval.index_build import add_shards, exact_topk, rows_at, write_index
from storage.fs import DataRoot
from storage.manifest import InputRef, Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddPlan:
    """A built index that the new shards can be added to."""

    built: Manifest  # the committed index/main manifest
    known: int  # the first `known` inputs are the built ones; the rest are new

    @property
    def rows(self) -> int:
        return int(self.built.metrics["ntotal"])


def add_plan(root: DataRoot, built: Manifest | None, inputs: Sequence[InputRef], version: str,
             params_hash: str, encoder: str) -> tuple[AddPlan | None, str]:
    """(the plan, "") when `inputs` are the built index's inputs plus new shards sorted after
    them, built by this stage version with these parameters and encoder; else (None, why)."""
    if built is None:
        return None, "no index yet"
    old = [(i.shard_id, i.digest) for i in built.inputs]
    new = [(i.shard_id, i.digest) for i in inputs]
    checks = (
        (built.stage_version == version, f"the index was built by stage version "
                                         f"{built.stage_version}"),
        (built.params_hash == params_hash, "index parameters changed"),
        (built.metrics.get("encoder", {}).get("fingerprint") == encoder, "the encoder changed"),
        (new[:len(old)] == old, "a known embedding shard changed or was removed, or new "
                                "shards sort before known ones"),
        (len(new) > len(old), "no new shards"),
        (all(root.exists(root.join(p)) for p in built.outputs), "index files are missing"),
    )
    why = next((reason for ok, reason in checks if not ok), "")
    return (None, why) if why else (AddPlan(built, len(old)), "")


def add_to_parts(root: DataRoot, plan: AddPlan, paths: Sequence[str], outs: Sequence[str],
                 added_rows: Sequence[int]) -> list[int]:
    """Each built (sub-)index read into memory (a mutable copy of the trained one: its quantizer
    is never retrained), the new shards' vectors added, written to `outs`; returns file sizes."""
    sizes = []
    for p, out in enumerate(outs):
        path = root.artifact("index", "main", part_suffixes(len(outs))[p])
        local = local_file(root, path, plan.built.outputs.get(root.rel(path), ""))
        index = faiss.read_index(local)  # not mapped: FAISS appends to what it holds
        add_shards(index, root, paths, added_rows[p], p, len(outs))
        sizes.append(write_index(root, out, index))
    return sizes


def drift(index: Any, root: DataRoot, paths: Sequence[str], counts: Sequence[int], start: int,
          sample: int, seed: int, k: int) -> float:
    """recall@k against exact search of a seeded sample of the rows from `start` on (the added
    ones): how well the kept quantizer places vectors it was not trained on."""
    n = sum(counts)
    rng = np.random.default_rng(seed)
    rows = start + rng.choice(n - start, min(sample, n - start), replace=False)
    q = rows_at(root, paths, counts, rows)
    k = min(k, n)
    truth = exact_topk(root, paths, q, k)
    _, got = index.search(q, k) if isinstance(index, ShardedIndex) else search_ties_by_id(index, q, k)
    hits = [len(set(t) & set(g)) for t, g in zip(truth, got, strict=True)]
    return round(float(np.sum(hits)) / truth.size, 4)


def added_metrics(plan: AddPlan, inputs: Sequence[InputRef], rows: int, recall: float | None,
                  threshold: float) -> dict[str, Any]:
    """The built index's record carried over, with this addition appended to its history. A
    retrain is due when the added vectors' recall falls below `threshold` times the recall the
    index had when it was trained (a PQ index's own recall may be far below 1 without drift)."""
    old = plan.built.metrics
    baseline = float(old.get("recall@10_vs_exact", 1.0))
    due = recall is not None and recall < threshold * baseline
    entry = {"shards": [i.shard_id for i in inputs[plan.known:]], "rows": rows,
             "at": iso_utc(),
             "recall@10_new_vs_exact": recall}
    return {"built": "added", "trained_rows": int(old.get("trained_rows", old["ntotal"])),
            "trained_at": old.get("trained_at", iso_utc(plan.built.created_at)),
            "train_vectors": old.get("train_vectors", 0),
            "added": [*old.get("added", []), entry],
            "drift": {"recall@10_new_vs_exact": recall, "recall@10_at_training": baseline,
                      "ratio": None if recall is None else round(recall / max(baseline, 1e-9), 4),
                      "retrain_below": threshold, "sample_of": rows},
            "retrain_due": bool(due or old.get("retrain_due", False))}


def iso_utc(t: float | None = None) -> str:
    """`t` (default now) as an ISO 8601 UTC timestamp, as the index manifest records them."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
