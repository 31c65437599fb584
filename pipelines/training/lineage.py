"""Lineage of token and neighbour shards (codebook, tokenizer, index): shared by sequence
assembly and the token store, free of torch so that `pack` stays a light process."""

from __future__ import annotations

from typing import Any

from storage.manifest import Manifest

QUERIES = ("text", "image")  # which part of x was the retrieval query (§3.4)


class LineageError(ValueError):
    """Token or neighbour shards that do not belong together (another codebook, index or vocab)."""


def shard_lineage(m: Manifest, fields: tuple[str, ...]) -> dict[str, Any]:
    """Lineage fields of a manifest, looked up in its metrics then its params."""
    found = {f: m.metrics.get(f, m.params.get(f)) for f in fields}
    missing = [f for f, v in found.items() if v is None]
    if missing:
        raise LineageError(f"{m.stage}/{m.shard_id} manifest records no {', '.join(missing)}; "
                           f"re-run `racm3 run {m.stage}` with the current code")
    return found


def same_lineage(manifests: list[Manifest], fields: tuple[str, ...]) -> dict[str, Any]:
    """The shared lineage of shards, or a LineageError naming two shards that disagree."""
    first = shard_lineage(manifests[0], fields)
    for m in manifests[1:]:
        other = shard_lineage(m, fields)
        if other != first:
            diff = next(f for f in fields if other[f] != first[f])
            raise LineageError(
                f"{m.stage} shards disagree on {diff}: {manifests[0].shard_id} has "
                f"{first[diff]!r}, {m.shard_id} has {other[diff]!r}; re-run `racm3 run {m.stage}` "
                f"so every shard comes from the same {diff}")
    return first


TOKEN_LINEAGE = ("codebook", "text_tokenizer", "n_text", "n_image")
NEIGHBOUR_LINEAGE = ("index_fingerprint", "encoder")


def check_pins(lineage: dict[str, Any], pins: dict[str, str]) -> None:
    """Refuse shards whose lineage differs from a value pinned in config (e.g. a checkpoint's)."""
    for name, want in pins.items():
        if want and lineage.get(name) != want:
            raise LineageError(f"{name} is {lineage.get(name)!r} but {want!r} is required; the "
                               f"shards were made with another {name}: re-run the upstream stages "
                               f"or change the pinned value")
