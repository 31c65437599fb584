"""Stage `retrieval-eval`: CLIP retriever recall@1/3/5 on the held-out COCO-format split (Table 4)."""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from model.clip_encoder import DocEncoder, decode_image, mix
from pipelines.config import StageConfig
from pipelines.stage import ShardContext, ShardResult, ShardSpec, Stage
from storage.fs import DataRoot, file_digest
from storage.manifest import InputRef, read_manifest, upstream_ref

log = logging.getLogger(__name__)

TASKS = ("text_to_image", "text_to_mixture", "image_to_text", "image_to_mixture")


@dataclass(frozen=True)
class RetrievalEvalConfig(StageConfig):
    """Which held-out split to score the retriever on, and at which cut-offs."""

    SECTION = "retrieval_eval"
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})
    coco: str = "demo/laion.coco/captions_val.json"  # COCO captions JSON (relative to the data root, or absolute)
    ks: tuple[int, ...] = (1, 3, 5)  # recall cut-offs (paper Table 4)
    image_dir: str = ""  # folder of the image files ("" = `images/` beside the JSON, or beside it)
    max_images: int = 0  # score at most this many held-out images (0 = all)
    batch_size: int = 64  # encoder batch size
    device: str = "cpu"  # "cpu", "cuda" or "auto"

    def __post_init__(self) -> None:
        self.check(len(self.ks) > 0 and min(self.ks) >= 1, "ks", "need cut-offs >= 1")
        self.check(self.max_images >= 0, "max_images", "must be >= 0 (0 = all)")


@dataclass
class CocoSplit:
    """Held-out images (encoded bytes) and their captions, in COCO file order."""

    images: list[bytes]
    captions: list[list[str]]  # per image, in annotation order
    entities: list[str] | None = None  # demo only: the entity each image shows


def resolve(root: DataRoot, path: str) -> str:
    return path if "://" in path or path.startswith("/") else root.join(path)


def load_coco(root: DataRoot, path: str, max_images: int = 0, image_dir: str = "") -> CocoSplit:
    """Read a COCO captions JSON and its image files (image_dir, or `images/` beside it, or beside it)."""
    path = resolve(root, path)
    if not root.exists(path):
        raise FileNotFoundError(f"COCO captions file {path} not found: run `racm3 run demo` or set "
                                f"`coco` to a captions_val.json with its images")
    with root.fs.open(path, "r") as f:
        coco = json.load(f)
    caps: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    images = [im for im in coco["images"] if len(caps.get(im["id"], [])) >= 2]
    images = images[:max_images] if max_images else images
    base = posixpath.dirname(path)
    dirs = [resolve(root, image_dir)] if image_dir else [posixpath.join(base, "images"), base]
    data = [_read_image(root, dirs, im["file_name"]) for im in images]
    ents = coco.get("racm3_entities")
    return CocoSplit(data, [caps[im["id"]] for im in images],
                     [ents[str(im["id"])] for im in images] if ents else None)


def _read_image(root: DataRoot, dirs: list[str], file_name: str) -> bytes:
    for d in dirs:
        if root.exists(p := posixpath.join(d, file_name)):
            with root.fs.open(p, "rb") as f:
                return f.read()
    raise FileNotFoundError(f"COCO image {file_name} not found in {' or '.join(dirs)}: set "
                            f"`retrieval_eval.image_dir` to the folder holding the images")


def recall(scores: np.ndarray, hits: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """scores (Q, M) similarities, hits (Q, M) bool relevance -> {"R@k": % of queries with a hit}."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(hits, order, axis=1)  # (Q, M) relevance in rank order
    return {f"R@{k}": round(100.0 * float(ranked[:, :k].any(axis=1).mean()), 2) for k in ks}


def table4(encoder: DocEncoder, split: CocoSplit, ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, Any]:
    """The four retrieval tasks of Table 4 on `split`.

    A mixture document is image i with its first caption; text queries are the other captions
    of each image (so no query is the memory's own text); image->text memory is every caption.
    """
    m = len(split.images)
    imgs = [decode_image(b, encoder.image_side) for b in split.images]
    if any(im is None for im in imgs):
        raise ValueError("a held-out image could not be decoded; regenerate the COCO split")
    image_emb = encoder.encode_image(imgs)  # type: ignore[arg-type]  # (M, D)
    flat = [(i, c) for i, caps in enumerate(split.captions) for c in caps]
    cap_emb = encoder.encode_text([c for _, c in flat])  # (sum captions, D)
    owner = np.array([i for i, _ in flat])
    first = np.cumsum([0] + [len(c) for c in split.captions[:-1]])  # (M,) first caption per image
    ones = np.ones(m, bool)
    mixture = mix(cap_emb[first], image_emb, ones, ones)  # (M, D)
    query = np.setdiff1d(np.arange(len(flat)), first)  # text queries: the non-first captions
    truth = owner[query][:, None] == np.arange(m)[None, :]  # (Q, M)
    out: dict[str, Any] = {
        "text_to_image": recall(cap_emb[query] @ image_emb.T, truth, ks),
        "text_to_mixture": recall(cap_emb[query] @ mixture.T, truth, ks),
        "image_to_text": recall(image_emb @ cap_emb.T, np.arange(m)[:, None] == owner[None, :], ks),
        "image_to_mixture": recall(image_emb @ mixture.T, np.eye(m, dtype=bool), ks),
    }
    out["chance"] = {f"R@{k}": round(100.0 * min(k, m) / m, 2) for k in ks}
    out["n_images"], out["n_text_queries"] = m, int(len(query))
    return out


class RetrievalEvalStage(Stage):
    """One shard `main`: Table 4 recall for the encoder that built the index."""

    name = "retrieval-eval"
    version = "1"
    section = "retrieval_eval"
    description = "CLIP retrieval recall@1/3/5 on the held-out COCO split (paper Table 4)"

    def plan(self, root: DataRoot, cfg: RetrievalEvalConfig) -> list[ShardSpec]:
        index = upstream_ref(root, "index", "main")
        return [ShardSpec(self.name, "main", (index, coco_ref(root, cfg.coco)))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: RetrievalEvalConfig = ctx.cfg
        from pipelines.index import index_encoder

        enc_info = index_encoder(ctx.root)
        encoder = DocEncoder.load(enc_info["model"], resolve(ctx.root, enc_info["checkpoint"]),
                                  enc_info["fingerprint"], cfg.device, cfg.batch_size)
        split = load_coco(ctx.root, cfg.coco, cfg.max_images, cfg.image_dir)
        result = table4(encoder, split, cfg.ks) | {"encoder": enc_info["fingerprint"]}
        if split.entities:  # demo: does the memory return documents about the same entity?
            result["memory_entity_hit"] = memory_entity_hits(ctx.root, encoder, split, cfg.ks)
        with ctx.root.fs.open(ctx.output_path("json"), "w") as f:
            json.dump(result, f, indent=2)
        log.info("retrieval-eval: %s", format_table(result))
        return ShardResult(rows_in=result["n_images"], rows_out=len(TASKS), metrics=result)


def memory_entity_hits(root: DataRoot, encoder: DocEncoder, split: CocoSplit,
                       ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """% of held-out queries whose top-k index neighbours include a doc naming the same entity.

    The demo's knowledge test: RA-CM3 can only copy an entity's look if retrieval finds it.
    """
    from pipelines.index import load_index

    index = load_index(root)
    index.check_encoder(encoder.info.fingerprint, encoder.info.dim)
    captions = memory_captions(root)
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


def memory_captions(root: DataRoot) -> dict[str, str]:
    """key -> caption over every download shard (demo scale only)."""
    from storage.manifest import list_manifests
    from storage.shards import read_table

    out: dict[str, str] = {}
    for m in list_manifests(root, "download"):
        t = read_table(root, root.artifact("download", m.shard_id, "parquet"), ["key", "caption"])
        out.update(zip(t["key"].to_pylist(), (c or "" for c in t["caption"].to_pylist()), strict=True))
    return out


def coco_ref(root: DataRoot, coco: str) -> InputRef:
    """The COCO split as an input: the demo stage's shard when it made it, else the file's digest."""
    path = resolve(root, coco)
    demo = read_manifest(root, "demo", "laion")
    if demo is not None and root.rel(path).startswith("demo/laion.coco"):
        return upstream_ref(root, "demo", "laion")
    if not root.exists(path):
        raise FileNotFoundError(f"COCO captions file {path} not found: run `racm3 run demo` or set "
                                f"`coco` to a captions_val.json with its images")
    return InputRef(path=root.rel(path), digest=file_digest(root.fs, path))


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
