"""Shared set-up for the retrieval tests: a tiny CLIP checkpoint, configs, synthetic embed shards."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch

from model.clip_encoder import create_clip
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard
from pipelines.retrieval.embed import EmbedConfig, embed_schema
from pipelines.retrieval.index import IndexConfig
from pipelines.retrieval.retrieve import RetrieveConfig
from storage.fs import DataRoot

CKPT = "weights/clip.pt"
# One in-process Beam worker: a worker process per core would import torch again per test
# (~20 s each on 2 loaded cores); the multi-process and distributed paths have their own tests.
ONE_WORKER = BeamConfig(direct_num_workers=1)


def write_checkpoint(root: DataRoot, seed: int = 0, path: str = CKPT) -> str:
    """A randomly initialised racm3-tiny state dict under the root (what fit-clip would write)."""
    torch.manual_seed(seed)
    model, *_ = create_clip("racm3-tiny")
    full = root.join(path)
    root.makedirs(full.rsplit("/", 1)[0])
    torch.save(model.state_dict(), full)
    return path


def configs(**sections) -> dict:
    """Config sections for run_stage without loading other engineers' stage modules."""
    cfgs = {"run": RunConfig(retries=0), "beam": ONE_WORKER, "embed": EmbedConfig(checkpoint=CKPT),
            "index": IndexConfig(), "retrieve": RetrieveConfig(variants=0)}
    cfgs.update(sections)
    return cfgs


class _FixedEmbed(Stage):
    name = "embed"
    version = "test"

    def __init__(self, table: pa.Table, metrics: dict):
        self.table, self.metrics = table, metrics

    def run_shard(self, ctx, resources):
        ctx.write_table(self.table)
        n = self.table.num_rows
        return ShardResult(rows_in=n, rows_out=n, metrics=self.metrics)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def hexsha(label: str) -> str:
    """A real sha256 hex digest standing for `label` ('' and digests stay as they are): equal
    labels, equal digests."""
    if not label or (len(label) == 64 and set(label) <= set("0123456789abcdef")):
        return label
    return hashlib.sha256(label.encode()).hexdigest()


def write_embed_shard(root: DataRoot, shard_id: str, keys: list[str], sha: list[str],
                      text: np.ndarray, image: np.ndarray, doc: np.ndarray,
                      encoder: str = "racm3-tiny@test", dim: int | None = None,
                      inputs: tuple = ()) -> None:
    """An embed shard with chosen vectors and the manifest metrics index/retrieve rely on;
    `inputs` (e.g. its download shard's ref) go into its manifest."""
    d = doc.shape[1]

    def col(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), d)

    sha = [hexsha(s) for s in sha]  # labels in, digests of the download stage's form out
    table = pa.Table.from_arrays([pa.array(keys), pa.array(sha), col(text), col(image), col(doc)],
                                 schema=embed_schema(d))
    metrics = {"encoder": encoder, "model": "racm3-tiny", "checkpoint": CKPT, "dim": dim or d}
    execute_shard(_FixedEmbed(table, metrics), root, None, ShardSpec("embed", shard_id, inputs))
