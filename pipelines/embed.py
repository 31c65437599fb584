"""Stage `embed` (Beam): text, image and mixed-modal document CLIP embeddings per download shard."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from model.clip_encoder import DocEncoder, check_model_name, decode_image, encoder_fingerprint
from pipelines.config import StageConfig
from pipelines.stage import ShardContext, ShardResult, ShardSpec, Stage
from storage.fs import DataRoot, file_digest
from storage.manifest import InputRef, list_manifests, read_manifest, upstream_ref
from storage.schemas import SUCCESS

log = logging.getLogger(__name__)

DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclass(frozen=True)
class EmbedConfig(StageConfig):
    """The CLIP document encoder and how its embeddings are stored."""

    SECTION = "embed"
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


def resolve(root: DataRoot, path: str) -> str:
    return path if "://" in path or path.startswith("/") else root.join(path)


def checkpoint_ref(root: DataRoot, checkpoint: str) -> InputRef:
    """The checkpoint as an input: its digest from the manifest that wrote it, else hashed here."""
    path = resolve(root, checkpoint)
    if not root.exists(path):
        raise FileNotFoundError(
            f"CLIP checkpoint {path} not found: supply an open_clip state-dict file there (paper "
            f"preset: the ViT-L-14 weights), set `embed.checkpoint`, or for the demo run "
            f"`racm3 run fit-clip` first")
    rel = root.rel(path)
    for m in list_manifests(root, "fit-clip"):
        if rel in m.outputs:
            return InputRef(path=rel, digest=m.outputs[rel], stage="fit-clip", shard_id=m.shard_id)
    return InputRef(path=rel, digest=file_digest(root.fs, path))


class EncoderCache:
    """Per-worker encoder, loaded on first use (the checkpoint's location is known only then)."""

    def __init__(self, device: str = "cpu", batch_size: int = 64, threads: int = 1):
        self.device, self.batch_size, self.threads = device, batch_size, threads
        self._key: tuple[str, str, str] | None = None
        self._encoder: DocEncoder | None = None

    def get(self, root: DataRoot, model: str, checkpoint: str, fingerprint: str) -> DocEncoder:
        key = (model, checkpoint, fingerprint)
        if self._key != key:
            import torch

            torch.set_num_threads(self.threads)
            local = local_copy(root, resolve(root, checkpoint))
            self._encoder = DocEncoder.load(model, local, fingerprint, self.device, self.batch_size)
            self._key = key
        return self._encoder  # type: ignore[return-value]


def local_copy(root: DataRoot, path: str) -> str:
    """A local file for open_clip to load: the path itself, or a cached copy of a remote one."""
    if root.is_local:
        return path
    dest = os.path.join(tempfile.gettempdir(), "racm3-ckpt", path.replace("/", "_"))
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        root.fs.get(path, dest + ".part")
        os.replace(dest + ".part", dest)
    return dest


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
    version = "1"
    section = "embed"
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
        keep = emb["has_text"] | emb["has_image"]
        ctx.write_table(to_table(rows, emb, keep, encoder.info.dim, cfg.dtype))
        return ShardResult(
            rows_in=table.num_rows, rows_out=int(keep.sum()),
            dropped={"failed_download": failed, "no_content": int((~keep).sum())},
            metrics={"encoder": fp, "model": cfg.model, "checkpoint": ctx.spec.inputs[1].path,
                     "dim": encoder.info.dim, "dtype": cfg.dtype,
                     "missing_part": {"empty_caption": int((~emb["has_text"]).sum()),
                                      "undecodable_image": int((~emb["has_image"]).sum())},
                     "docs_per_s": round(len(rows) / max(seconds, 1e-9), 1)})


def embed_encoder(root: DataRoot, shard_id: str) -> dict[str, Any]:
    """model, checkpoint, fingerprint and dim recorded by an embed shard's manifest."""
    m = read_manifest(root, "embed", shard_id)
    if m is None:
        raise FileNotFoundError(f"embed shard {shard_id} has no manifest: run `racm3 run embed` first")
    return {k: m.metrics[k] for k in ("model", "checkpoint", "encoder", "dim")}
