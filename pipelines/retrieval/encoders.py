"""Which CLIP encoder a stage uses: checkpoint lineage, a per-worker cache, and the recorded identity."""

from __future__ import annotations

from typing import Any

from model.clip_encoder import DocEncoder
from storage.fs import DataRoot, file_digest
from storage.manifest import InputRef, list_manifests, read_manifest


def checkpoint_ref(root: DataRoot, checkpoint: str) -> InputRef:
    """The checkpoint as an input: its digest from the manifest that wrote it, else hashed here."""
    path = root.resolve(checkpoint)
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
            local = root.local_copy(root.resolve(checkpoint))
            self._encoder = DocEncoder.load(model, local, fingerprint, self.device, self.batch_size)
            self._key = key
        return self._encoder  # type: ignore[return-value]


def embed_encoder(root: DataRoot, shard_id: str) -> dict[str, Any]:
    """model, checkpoint, fingerprint and dim recorded by an embed shard's manifest."""
    m = read_manifest(root, "embed", shard_id)
    if m is None:
        raise FileNotFoundError(f"embed shard {shard_id} has no manifest: run `racm3 run embed` first")
    return {k: m.metrics[k] for k in ("model", "checkpoint", "encoder", "dim")}


def index_encoder(root: DataRoot) -> dict[str, Any]:
    """model, checkpoint, fingerprint, dim of the encoder the index was built with."""
    m = read_manifest(root, "index", "main")
    if m is None:
        raise FileNotFoundError("no FAISS index: run `racm3 run index` first")
    return m.metrics["encoder"]
