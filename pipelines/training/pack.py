"""Stage `pack`: token and neighbour shards into the memory-mapped token store training reads.

One output part (a few files) per input shard (layout and id scheme in
`pipelines.training.token_store`):
`t-<id>` from tokenize shard <id> (its only input, so a new token shard packs alone) and
`n-<id>` from retrieve shard <id> plus every tokenize shard (global ids depend on all of them).
The key -> id index over every tokenize shard is built once per run (per worker) and shared
by all neighbour parts of that run, so pack's work grows with the corpus, not its square.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from model.document import Vocab
from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.training.lineage import NEIGHBOUR_LINEAGE, TOKEN_LINEAGE, shard_lineage
from pipelines.training.token_store import (
    STAGE,
    KeyIndex,
    fixed_width,
    neighbour_part_id,
    token_part_id,
    write_neighbour_part,
    write_token_part,
)
from storage.fs import TMP_MARK, DataRoot
from storage.manifest import list_manifests, read_manifest, upstream_ref
from storage.shards import read_table


@dataclass(frozen=True)
class PackConfig(StageConfig):
    """Section [pack]: only where parts are built before they are copied to an object store."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"work_dir"})

    work_dir: str = ""  # local scratch for non-local data roots ("" = the system temp dir)


class PackStage(Stage):
    """Token parts (one per tokenize shard) and neighbour parts (one per retrieve shard)."""

    name = "pack"
    version = "1"
    config = PackConfig
    engine = "local"
    description = "pack token and neighbour shards into the memory-mapped token store"

    def plan(self, root: DataRoot, cfg: PackConfig) -> list[ShardSpec]:
        tok = sorted(m.shard_id for m in list_manifests(root, "tokenize"))
        if not tok:
            raise FileNotFoundError(f"no tokenize shards under {root.join('tokenize')}: "
                                    f"run `racm3 run tokenize` first")
        tok_refs = tuple(upstream_ref(root, "tokenize", i) for i in tok)
        specs = [ShardSpec(self.name, token_part_id(i), (r,)) for i, r in zip(tok, tok_refs, strict=True)]
        for i in sorted(m.shard_id for m in list_manifests(root, "retrieve")):
            specs.append(ShardSpec(self.name, neighbour_part_id(i),
                                   (upstream_ref(root, "retrieve", i), *tok_refs)))
        return specs

    def load(self, cfg: PackConfig) -> KeyIndexCache:
        return KeyIndexCache()

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        if ctx.spec.shard_id.startswith("t-"):
            return self.pack_tokens(ctx)
        return self.pack_neighbours(ctx, resources or KeyIndexCache())

    def pack_tokens(self, ctx: ShardContext) -> ShardResult:
        ref = ctx.spec.inputs[0]
        m = read_manifest(ctx.root, "tokenize", ref.shard_id)
        assert m is not None  # planned from its manifest
        lineage = shard_lineage(m, TOKEN_LINEAGE)
        vocab = Vocab(n_text=int(lineage["n_text"]), n_image=int(lineage["n_image"]))
        table = ctx.read_input(0, ["key", "caption_ids", "image_codes"])
        with built(ctx) as out_dir:
            stats = write_token_part(table, vocab, out_dir)
        return ShardResult(rows_in=table.num_rows, rows_out=stats["docs"],
                           metrics={**lineage, **stats, "token_shard": ref.shard_id})

    def pack_neighbours(self, ctx: ShardContext, cache: KeyIndexCache) -> ShardResult:
        ref = ctx.spec.inputs[0]
        m = read_manifest(ctx.root, "retrieve", ref.shard_id)
        assert m is not None
        lineage = shard_lineage(m, NEIGHBOUR_LINEAGE)
        table = ctx.read_input(0, ["key", "query", "variant", "neighbor_keys"])
        index = cache.get(ctx)
        with built(ctx) as out_dir:
            stats = write_neighbour_part(table, index, out_dir)
        dropped = {k: stats[k] for k in ("rows_without_tokens",) if stats[k]}
        # layout: what the ids were resolved against ([token shard id, documents] per part)
        return ShardResult(rows_in=table.num_rows, rows_out=stats["rows"], dropped=dropped,
                           metrics={**lineage, **stats, "token_parts": index.layout})


class KeyIndexCache:
    """Per-worker resources of pack: the KeyIndex of the tokenize inputs (by path and digest),
    built by the first neighbour part that needs it; the others of the run reuse it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # shards run on threads: one build, the rest wait for it
        self.key: tuple[Any, ...] | None = None
        self.index: KeyIndex | None = None

    def get(self, ctx: ShardContext) -> KeyIndex:
        key = (ctx.root.uri, *((r.path, r.digest) for r in ctx.spec.inputs[1:]))
        with self.lock:
            if self.index is None or self.key != key:
                self.index, self.key = KeyIndex.build(token_keys(ctx)), key
            return self.index


def token_keys(ctx: ShardContext) -> Iterator[tuple[str, np.ndarray]]:
    """(token shard id, keys in row order) per tokenize input, in input (global id) order."""
    for i, ref in enumerate(ctx.spec.inputs[1:], start=1):
        keys = read_table(ctx.root, ctx.input_path(i), ["key"]).column("key").to_pylist()
        yield ref.shard_id, fixed_width(keys)


class built:
    """A local scratch folder to build a part in; on success each file in it becomes one temp
    output of the shard (`pack/<shard>.<file>`), moved or uploaded through fsspec."""

    def __init__(self, ctx: ShardContext):
        self.ctx = ctx
        local_root = ctx.root.join(STAGE) if ctx.root.is_local else None
        if local_root:
            os.makedirs(local_root, exist_ok=True)
        self.local = tempfile.mkdtemp(prefix=f"{ctx.spec.shard_id}.build{TMP_MARK}",
                                      dir=local_root or ctx.cfg.work_dir or None)

    def __enter__(self) -> str:
        return self.local

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            if exc_type is None:
                for name in sorted(os.listdir(self.local)):
                    tmp = self.ctx.output_path(name)
                    if self.ctx.root.is_local:  # same folder: a rename
                        os.replace(os.path.join(self.local, name), tmp)
                    else:
                        self.ctx.root.fs.put_file(os.path.join(self.local, name), tmp)
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
