"""Stage `embed` (Beam): text, image and mixed-modal document CLIP embeddings per download shard."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from model.clip_encoder import DocEncoder, check_model_name, decode_image, encoder_fingerprint
from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.retrieval.encoders import EncoderCache, checkpoint_ref
from storage.fs import DataRoot
from storage.manifest import list_manifests, upstream_ref
from storage.schemas import SUCCESS

log = logging.getLogger(__name__)

DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclass(frozen=True)
class EmbedConfig(StageConfig):
    """The CLIP document encoder and how its embeddings are stored."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "threads"})
    model: str = "racm3-tiny"  # open_clip model config name (paper: ViT-L-14)
    checkpoint: str = "fit-clip/model.pt"  # open_clip state dict (relative to the data root, or absolute)
    dtype: str = "float32"  # stored embedding type: float32 or float16
    batch_size: int = 64  # encoder batch size
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    threads: int = 1  # torch CPU threads per worker

    def __post_init__(self) -> None:
        self.check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        try:
            check_model_name(self.model)
        except ValueError as e:
            self.check(False, "model", str(e))


def embed_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    # Fixed size; a missing part is an all-zero vector (Parquet readers choke on null fixed lists).
    vec = pa.list_(DTYPES[dtype], dim)
    return pa.schema([("key", pa.string()), ("sha256", pa.string()), ("text_emb", vec),
                      ("image_emb", vec), ("doc_emb", vec)])


def split_rows(table: pa.Table) -> tuple[list[dict[str, Any]], int]:
    """(rows with a successful download, number of failed downloads)."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == SUCCESS and r["jpg"]]
    return ok, len(rows) - len(ok)


def embed_rows(encoder: DocEncoder, rows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Embeddings of `rows` (key, caption, jpg) in batches; counts missing parts."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("text_emb", "image_emb", "doc_emb",
                                                          "has_text", "has_image")}
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        images = [decode_image(r["jpg"], encoder.image_side) for r in chunk]
        out = encoder.encode_docs([r["caption"] for r in chunk], images)
        for k in parts:
            parts[k].append(out[k])
    dim = encoder.info.dim
    return {k: np.concatenate(v) if v else np.zeros((0, dim) if "emb" in k else 0)
            for k, v in parts.items()}


def to_table(rows: list[dict[str, Any]], emb: dict[str, Any], keep: np.ndarray, dim: int,
             dtype: str) -> pa.Table:
    np_dtype = np.float16 if dtype == "float16" else np.float32

    def column(name: str) -> pa.Array:
        flat = pa.array(emb[name][keep].astype(np_dtype).ravel(), type=DTYPES[dtype])
        return pa.FixedSizeListArray.from_arrays(flat, dim)

    kept = [r for r, k in zip(rows, keep, strict=True) if k]
    return pa.Table.from_arrays(
        [pa.array([r["key"] for r in kept], pa.string()), pa.array([r["sha256"] for r in kept], pa.string()),
         column("text_emb"), column("image_emb"), column("doc_emb")],
        schema=embed_schema(dim, dtype))


class EmbedStage(Stage):
    """One embedding shard per download shard; the encoder is an input, so new weights re-embed."""

    name = "embed"
    version = "2"  # 2: the demo CLIP sees a centre crop (model.clip_encoder.CENTRE_CROP)
    config = EmbedConfig
    engine = "beam"
    description = "CLIP text/image/document embeddings (paper §3.2, Fig 1b)"

    def plan(self, root: DataRoot, cfg: EmbedConfig) -> list[ShardSpec]:
        ckpt = checkpoint_ref(root, cfg.checkpoint)
        shards = sorted(m.shard_id for m in list_manifests(root, "download"))
        return [ShardSpec(self.name, s, (upstream_ref(root, "download", s), ckpt)) for s in shards]

    def load(self, cfg: EmbedConfig) -> EncoderCache:
        return EncoderCache(cfg.device, cfg.batch_size, cfg.threads)

    def run_shard(self, ctx: ShardContext, resources: EncoderCache | None) -> ShardResult:
        cfg: EmbedConfig = ctx.cfg
        cache = resources or self.load(cfg)
        fp = encoder_fingerprint(cfg.model, ctx.spec.inputs[1].digest)
        encoder = cache.get(ctx.root, cfg.model, ctx.spec.inputs[1].path, fp)
        table = ctx.read_input(0, ["key", "caption", "status", "jpg", "sha256"])
        rows, failed = split_rows(table)
        t0 = time.time()
        emb = embed_rows(encoder, rows, cfg.batch_size)
        seconds = time.time() - t0
        # as booleans: an empty shard's masks are empty arrays of no particular dtype
        has_text, has_image = (np.asarray(emb[k], dtype=bool) for k in ("has_text", "has_image"))
        keep = has_text | has_image
        ctx.write_table(to_table(rows, emb, keep, encoder.info.dim, cfg.dtype))
        return ShardResult(
            rows_in=table.num_rows, rows_out=int(keep.sum()),
            dropped={"failed_download": failed, "no_content": int((~keep).sum())},
            metrics={"encoder": fp, "model": cfg.model, "checkpoint": ctx.spec.inputs[1].path,
                     "dim": encoder.info.dim, "dtype": cfg.dtype,
                     "missing_part": {"empty_caption": int((~has_text).sum()),
                                      "undecodable_image": int((~has_image).sum())},
                     "docs_per_s": round(len(rows) / max(seconds, 1e-9), 1)})


