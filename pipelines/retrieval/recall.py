"""Stage `retrieval-eval`: CLIP retriever recall@1/3/5 on the held-out COCO-format split (Table 4)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from model.clip_encoder import DocEncoder, decode_image
from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.retrieval.recall_metrics import TASKS, table4
from storage.coco import CocoSplit, coco_ref, load_coco
from storage.fs import DataRoot
from storage.manifest import upstream_ref

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalEvalConfig(StageConfig):
    """Which held-out split to score the retriever on, and at which cut-offs."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})
    coco: str = "demo/laion.coco/captions_test.json"  # COCO captions JSON (relative to the data root, or absolute): the demo test split
    ks: tuple[int, ...] = (1, 3, 5)  # recall cut-offs (paper Table 4)
    image_dir: str = ""  # folder of the image files ("" = `images/` beside the JSON, or beside it)
    max_images: int = 0  # score at most this many held-out images (0 = all)
    batch_size: int = 64  # encoder batch size
    device: str = "cpu"  # "cpu", "cuda" or "auto"

    def __post_init__(self) -> None:
        self.check(len(self.ks) > 0 and min(self.ks) >= 1, "ks", "need cut-offs >= 1")
        self.check(self.max_images >= 0, "max_images", "must be >= 0 (0 = all)")


class RetrievalEvalStage(Stage):
    """One shard `main`: Table 4 recall for the encoder that built the index."""

    name = "retrieval-eval"
    version = "1"
    config = RetrievalEvalConfig
    description = "CLIP retrieval recall@1/3/5 on the held-out COCO split (paper Table 4)"

    def plan(self, root: DataRoot, cfg: RetrievalEvalConfig) -> list[ShardSpec]:
        index = upstream_ref(root, "index", "main")
        return [ShardSpec(self.name, "main", (index, coco_ref(root, cfg.coco)))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: RetrievalEvalConfig = ctx.cfg
        from pipelines.retrieval.encoders import index_encoder

        enc_info = index_encoder(ctx.root)
        encoder = DocEncoder.load(enc_info["model"], ctx.root.local_copy(ctx.root.resolve(enc_info["checkpoint"])),
                                  enc_info["fingerprint"], cfg.device, cfg.batch_size)
        split = load_coco(ctx.root, cfg.coco, cfg.max_images, cfg.image_dir, min_captions=2)
        result = table4(encoder, split, cfg.ks) | {"encoder": enc_info["fingerprint"]}
        if split.entities:  # demo: does the memory return documents about the same entity?
            result["memory_entity_hit"] = memory_entity_hits(ctx.root, encoder, split, cfg.ks)
        with ctx.root.fs.open(ctx.output_path("json"), "w") as f:
            json.dump(result, f, indent=2)
        log.info("retrieval-eval: %s", format_table(result))
        return ShardResult(rows_in=result["n_images"], rows_out=len(TASKS), metrics=result,
                           dropped=split.skipped)


def memory_entity_hits(root: DataRoot, encoder: DocEncoder, split: CocoSplit,
                       ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """% of held-out queries whose top-k index neighbours include a doc naming the same entity.

    The demo's knowledge test: RA-CM3 can only copy an entity's look if retrieval finds it.
    """
    from pipelines.retrieval.faiss_index import load_index

    index = load_index(root)
    index.check_encoder(encoder.info.fingerprint, encoder.info.dim)
    captions = download_captions(root)
    names = np.asarray([captions.get(k, "") for k in index.keys], dtype=object)
    imgs = [decode_image(b, encoder.image_side) for b in split.images]
    queries = {"text": encoder.encode_text([c[0] for c in split.captions]),
               "image": encoder.encode_image(imgs)}  # type: ignore[arg-type]
    out = {}
    for kind, q in queries.items():
        _, ids = index.search(q, max(ks))
        hits = np.array([[f" {ent} " in f" {names[i]} ".replace(",", " ") for i in row]
                         for row, ent in zip(ids, split.entities or [], strict=True)])
        out[f"{kind}_query"] = {f"R@{k}": round(100.0 * float(hits[:, :k].any(axis=1).mean()), 2)
                                for k in ks}
    return out


def download_captions(root: DataRoot) -> dict[str, str]:
    """key -> caption over every download shard (demo scale only)."""
    from storage.manifest import list_manifests
    from storage.shards import read_table

    out: dict[str, str] = {}
    for m in list_manifests(root, "download"):
        t = read_table(root, root.artifact("download", m.shard_id, "parquet"), ["key", "caption"])
        out.update(zip(t["key"].to_pylist(), (c or "" for c in t["caption"].to_pylist()), strict=True))
    return out


def format_table(result: dict[str, Any]) -> str:
    """Table 4 as text: one line per task with R@k columns."""
    ks = list(result["chance"])
    lines = [f"{'task':<18}" + "".join(f"{k:>8}" for k in ks)]
    for task in (*TASKS, "chance"):
        lines.append(f"{task:<18}" + "".join(f"{result[task][k]:>8.1f}" for k in ks))
    lines.append(f"({result['n_images']} held-out images, {result['n_text_queries']} text queries)")
    for kind, row in result.get("memory_entity_hit", {}).items():
        lines.append(f"{'memory, ' + kind:<18}" + "".join(f"{row[k]:>8.1f}" for k in ks)
                     + "   (a neighbour from the index names the same entity)")
    return "\n".join(lines)


def show_retrieval_eval(root: DataRoot) -> str:
    """What `racm3` prints for the retrieval evaluation (reads the stage's JSON)."""
    path = root.artifact("retrieval-eval", "main", "json")
    if not root.exists(path):
        return "no retrieval evaluation yet: run `racm3 run retrieval-eval`"
    with root.fs.open(path, "r") as f:
        return format_table(json.load(f))
