"""Look up what the retriever returns for one caption or image (`racm3 search`), and show it as HTML."""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from model.clip_encoder import DocEncoder, decode_image
from pipelines.retrieval.encoders import index_encoder
from pipelines.retrieval.faiss_index import LoadedIndex, load_index
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table

log = logging.getLogger(__name__)


class MemoryMismatch(ValueError):
    """The memory's index was built by another encoder than the one encoding the query."""


@dataclass
class Hit:
    """One retrieved memory document."""

    rank: int
    key: str
    score: float
    caption: str
    jpg: bytes | None


def load_encoder(root: DataRoot, device: str = "cpu") -> DocEncoder:
    """The encoder that built `root`'s index (its recorded checkpoint and fingerprint)."""
    info = index_encoder(root)
    local = root.local_copy(root.resolve(info["checkpoint"]))
    return DocEncoder.load(info["model"], local, info["fingerprint"], device)


def open_memory(memory: DataRoot, encoder: DocEncoder) -> LoadedIndex:
    """`memory`'s index, refused when another encoder built it (its scores would be meaningless)."""
    index = load_index(memory, use_gpu=False)
    theirs = index.encoder.get("fingerprint", "")
    if theirs != encoder.info.fingerprint or index.dim != encoder.info.dim:
        raise MemoryMismatch(
            f"the memory at {memory.uri} was embedded by encoder {theirs} (dim {index.dim}), but "
            f"the queries are encoded by {encoder.info.fingerprint} (dim {encoder.info.dim}): a "
            f"memory must be embedded and indexed with the loaded encoder (`racm3 run embed` and "
            f"`racm3 run index` on it with the same `embed.checkpoint`)")
    return index


def query_vector(encoder: DocEncoder, caption: str = "", image: Image.Image | None = None) -> np.ndarray:
    """(1, D) the query as a document: a caption, an image, or both mixed (as the memory's keys)."""
    if not caption.strip() and image is None:
        raise ValueError("give a caption or an image to search with")
    return encoder.encode_docs([caption or None], [image])["doc_emb"]


def documents(root: DataRoot, keys: list[str]) -> dict[str, tuple[str, bytes | None]]:
    """key -> (caption, jpg) for these keys, read from the download shards (only their rows)."""
    want = set(keys)
    value_set = pa.array(sorted(want), pa.string())
    out: dict[str, tuple[str, bytes | None]] = {}
    for m in list_manifests(root, "download"):
        t = read_table(root, root.artifact("download", m.shard_id, "parquet"), ["key", "caption", "jpg"])
        t = t.filter(pc.is_in(t["key"], value_set=value_set))
        for r in t.to_pylist():
            out[r["key"]] = (r["caption"] or "", r["jpg"])
        if len(out) == len(want):
            break
    return out


def search(encoder: DocEncoder, memory: DataRoot, k: int, caption: str = "",
           image: Image.Image | None = None) -> list[Hit]:
    """The memory's top-k documents for the query, best first."""
    index = open_memory(memory, encoder)
    scores, ids = index.search(query_vector(encoder, caption, image), k)
    found = [(float(s), str(index.keys[i])) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
    docs = documents(memory, [key for _, key in found])
    return [Hit(r + 1, key, s, *docs.get(key, ("", None))) for r, (s, key) in enumerate(found)]


def read_image(path: str, side: int | None) -> Image.Image:
    """A query image file, decoded as the memory's images are."""
    with open(path, "rb") as f:
        img = decode_image(f.read(), side)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    return img


def jpeg_bytes(img: Image.Image) -> bytes:
    """The query image as JPEG bytes (for the page's thumbnail)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def format_hits(hits: list[Hit]) -> str:
    lines = [f"{'rank':>4}  {'score':>6}  {'key':<14} caption"]
    lines += [f"{h.rank:>4}  {h.score:>6.3f}  {h.key:<14} {h.caption}" for h in hits]
    return "\n".join(lines)


def html_page(hits: list[Hit], query: str, query_jpg: bytes | None, memory: str) -> str:
    """A self-contained page (thumbnails inline as data URIs; every text escaped)."""
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{h.rank}</td><td>{_img(h.jpg)}</td><td>{h.score:.3f}</td>"
        f"<td><code>{esc(h.key)}</code></td><td>{esc(h.caption)}</td></tr>" for h in hits)
    qimg = _img(query_jpg) if query_jpg else ""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>racm3 search</title>"
            "<style>body{font-family:sans-serif}td{padding:4px 8px;vertical-align:middle}"
            "img{width:96px;image-rendering:pixelated}</style></head><body>"
            f"<h1>racm3 search</h1><p>query: {esc(query)} {qimg}</p><p>memory: {esc(memory)}</p>"
            "<table><tr><th>rank</th><th>image</th><th>score</th><th>key</th><th>caption</th></tr>"
            f"{rows}</table></body></html>\n")


def _img(jpg: bytes | None) -> str:
    if not jpg:
        return "(no image)"
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(jpg).decode()}'>"
