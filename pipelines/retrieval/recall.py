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
from pipelines.retrieval.recall_metrics import TASKS, entity_hit_rates, table4
from storage.coco import CocoSplit, coco_ref, load_coco
from storage.fs import DataRoot
from storage.manifest import upstream_ref

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalEvalConfig(StageConfig):
    """Which held-out split to score the retriever on, and at which cut-offs."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})
    coco: str = "demo/laion.coco/captions_test.json"  # COCO captions JSON (relative to the data root, or absolute): the demo test split
    dev_coco: str = "demo/laion.coco/captions_dev.json"  # also scored for same-entity hits when present ("" = skip): choices are made on it
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
    version = "2"  # 2: same-entity hit rates at ranks 1 and 2, on dev too, from the demo's truth
    config = RetrievalEvalConfig
    description = "CLIP retrieval recall@1/3/5 on the held-out COCO split (paper Table 4)"

    def plan(self, root: DataRoot, cfg: RetrievalEvalConfig) -> list[ShardSpec]:
        inputs = [upstream_ref(root, "index", "main"), coco_ref(root, cfg.coco)]
        if cfg.dev_coco and root.exists(root.resolve(cfg.dev_coco)):
            dev = coco_ref(root, cfg.dev_coco)  # the demo's shard, the same input as the test split's
            if all(dev.path != i.path for i in inputs):
                inputs.append(dev)
        return [ShardSpec(self.name, "main", tuple(inputs))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: RetrievalEvalConfig = ctx.cfg
        from pipelines.retrieval.encoders import index_encoder

        enc_info = index_encoder(ctx.root)
        encoder = DocEncoder.load(enc_info["model"], ctx.root.local_copy(ctx.root.resolve(enc_info["checkpoint"])),
                                  enc_info["fingerprint"], cfg.device, cfg.batch_size)
        split = load_coco(ctx.root, cfg.coco, cfg.max_images, cfg.image_dir, min_captions=2)
        result = table4(encoder, split, cfg.ks) | {"encoder": enc_info["fingerprint"], "coco": cfg.coco}
        if split.entities:  # demo: does the memory return documents about the same entity?
            result["memory_entity_hit"] = memory_entity_hits(ctx.root, encoder, split, cfg.ks)
        if cfg.dev_coco and ctx.root.exists(ctx.root.resolve(cfg.dev_coco)):
            dev = load_coco(ctx.root, cfg.dev_coco, 0, cfg.image_dir, min_captions=1)
            if dev.entities:
                result["memory_entity_hit_dev"] = memory_entity_hits(ctx.root, encoder, dev, cfg.ks)
                result["dev_coco"] = cfg.dev_coco
        with ctx.root.fs.open(ctx.output_path("json"), "w") as f:
            json.dump(result, f, indent=2)
        log.info("retrieval-eval: %s", format_table(result))
        return ShardResult(rows_in=result["n_images"], rows_out=len(TASKS), metrics=result,
                           dropped=split.skipped)


def memory_entity_hits(root: DataRoot, encoder: DocEncoder, split: CocoSplit,
                       ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Same-entity hit rates of the memory's neighbours for caption and image queries (ranks 1
    and 2, and R@k): the demo's knowledge test, since RA-CM3 can only copy an entity's look if
    retrieval finds it. A caption query is each image's first caption."""
    from pipelines.retrieval.faiss_index import load_index

    index = load_index(root)
    index.check_encoder(encoder.info.fingerprint, encoder.info.dim)
    mem = memory_entities(root, list(index.keys), set(split.entities or []))
    imgs = [decode_image(b, encoder.image_side) for b in split.images]
    queries = {"text": encoder.encode_text([c[0] for c in split.captions]),
               "image": encoder.encode_image(imgs)}  # type: ignore[arg-type]
    want = np.asarray(split.entities or [], dtype=object)
    out = {}
    for kind, q in queries.items():
        _, ids = index.search(q, max(*ks, 2))
        out[f"{kind}_query"] = entity_hit_rates(ids, mem, want, ks)
    return out


def memory_entities(root: DataRoot, keys: list[str], names: set[str]) -> np.ndarray:
    """The entity name of each memory key: from the demo generator's truth (URL -> entity) when
    the data root has it, else the caption word among `names` ("" when none)."""
    from pipelines.demo.paths import metadata_path

    meta = metadata_path(root)
    truth, ents = meta.replace(".parquet", ".truth.parquet"), meta.replace(".parquet", ".entities.parquet")
    rows = memory_rows(root)
    if root.exists(truth) and root.exists(ents):
        from storage.shards import read_table

        t = read_table(root, truth, ["URL", "entity"])
        e = read_table(root, ents, ["entity", "name"])
        name_of = dict(zip(e["entity"].to_pylist(), e["name"].to_pylist(), strict=True))
        by_url = {u: name_of.get(x, "") for u, x in zip(t["URL"].to_pylist(), t["entity"].to_pylist(),
                                                        strict=True)}
        return np.asarray([by_url.get(rows.get(k, ("", ""))[0], "") for k in keys], dtype=object)
    return np.asarray([caption_entity(rows.get(k, ("", ""))[1], names) for k in keys], dtype=object)


def caption_entity(caption: str, names: set[str]) -> str:
    """The first caption word that is one of `names` ("" when none)."""
    return next((w for w in caption.replace(",", " ").split() if w in names), "")


def memory_rows(root: DataRoot) -> dict[str, tuple[str, str]]:
    """key -> (url, caption) over every download shard (demo scale only)."""
    from storage.manifest import list_manifests
    from storage.shards import read_table

    out: dict[str, tuple[str, str]] = {}
    for m in list_manifests(root, "download"):
        t = read_table(root, root.artifact("download", m.shard_id, "parquet"), ["key", "url", "caption"])
        caps = [c or "" for c in t["caption"].to_pylist()]
        out.update(zip(t["key"].to_pylist(), zip(t["url"].to_pylist(), caps, strict=True), strict=True))
    return out


def format_table(result: dict[str, Any]) -> str:
    """Table 4 as text: one line per task with R@k columns."""
    ks = list(result["chance"])
    lines = [f"{'task':<18}" + "".join(f"{k:>8}" for k in ks)]
    for task in (*TASKS, "chance"):
        lines.append(f"{task:<18}" + "".join(f"{result[task][k]:>8.1f}" for k in ks))
    lines.append(f"({result['n_images']} held-out images, {result['n_text_queries']} text queries)")
    for split, key in (("coco", "memory_entity_hit"), ("dev_coco", "memory_entity_hit_dev")):
        rows = result.get(key, {})
        if rows:
            name = result.get(split, split).rpartition("/")[2]
            lines.append(f"same entity among the memory's neighbours ({name}, % of queries):")
            lines.append(f"{'':<18}" + "".join(f"{c:>8}" for c in next(iter(rows.values()))))
        for kind, row in rows.items():
            lines.append(f"{kind.replace('text', 'caption'):<18}" + "".join(f"{v:>8.1f}" for v in row.values()))
    return "\n".join(lines)


def show_retrieval_eval(root: DataRoot) -> str:
    """What `racm3` prints for the retrieval evaluation (reads the stage's JSON)."""
    path = root.artifact("retrieval-eval", "main", "json")
    if not root.exists(path):
        return "no retrieval evaluation yet: run `racm3 run retrieval-eval`"
    with root.fs.open(path, "r") as f:
        return format_table(json.load(f))
