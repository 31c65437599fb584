"""What an evaluate-part shard leaves for the reduce step: per-image records (JSON), judge features
(NPZ, NaN rows where a model made no image) and the report's example figures (PNG)."""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.evaluation.models import MODELS
from storage.fs import DataRoot


@dataclass
class ShardRecords:
    """One shard's results, or several shards' concatenated in split order."""

    images: list[dict[str, Any]]  # per image: position, image_id, refs, captions, clip, nll
    features: dict[str, np.ndarray]  # "real" and each model -> (n, D)
    counts: dict[str, int]  # the split's counts (metadata once, image skips summed)
    guard: dict[str, Any]  # the leakage guard's summary (the same in every shard)
    show: list[dict[str, Any]]  # report examples: texts and figure paths
    fid_features: str  # the judge's metric name


def image_record(ex: Any) -> dict[str, Any]:
    return {"position": ex.item.position, "image_id": ex.item.image_id, "refs": ex.item.captions,
            "captions": dict(ex.captions), "clip": dict(ex.clip),
            "nll": {run: {k: list(v) for k, v in d.items()} for run, d in ex.nll.items()},
            "context": {"caption": list(ex.by_caption), "image": list(ex.by_image)},
            "same_entity": dict(ex.same_entity), "caption_entity": dict(ex.caption_entity)}


def features_of(examples: list[Any], extract: Any) -> dict[str, np.ndarray]:
    """Judge features of the real images and of each model's kept images (NaN where none)."""
    if not examples:
        return {}
    real = extract([ex.real for ex in examples])
    out = {"real": real}
    for m in MODELS:
        f = np.full(real.shape, np.nan, np.float32)
        rows = [i for i, ex in enumerate(examples) if m in ex.images]
        if rows:
            f[rows] = extract([examples[i].images[m] for i in rows])
        out[m] = f
    return out


def write_part(root: DataRoot, json_path: str, npz_path: str, part: ShardRecords) -> None:
    with root.fs.open(json_path, "w") as f:
        json.dump({"images": part.images, "counts": part.counts, "guard": part.guard,
                   "show": part.show, "fid_features": part.fid_features}, f)
    buf = io.BytesIO()
    np.savez(buf, **part.features)  # type: ignore[arg-type]
    with root.fs.open(npz_path, "wb") as f:
        f.write(buf.getvalue())


IMAGE_SKIPS = ("skipped_missing_image", "skipped_undecodable_image")


def read_parts(root: DataRoot, shard_ids: list[str]) -> ShardRecords:
    """Every part shard's results in split order (counts of image skips summed)."""
    images: list[dict[str, Any]] = []
    feats: list[dict[str, np.ndarray]] = []
    show: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    guard: dict[str, Any] = {}
    judge = ""
    for sid in shard_ids:
        with root.fs.open(root.artifact("evaluate-part", sid, "json"), "r") as f:
            d = json.load(f)
        with root.fs.open(root.artifact("evaluate-part", sid, "npz"), "rb") as f:
            z = np.load(io.BytesIO(f.read()))
            if z.files:
                feats.append({k: z[k] for k in z.files})
        images += d["images"]
        show += [s | {"figures": posixpath.join(root.artifact("evaluate-part", sid, "figures"))}
                 for s in d["show"]]
        if not counts:
            counts, guard, judge = dict(d["counts"]), d["guard"], d["fid_features"]
        else:
            for k in (*IMAGE_SKIPS, "usable_images"):
                counts[k] = counts.get(k, 0) + d["counts"].get(k, 0)
    keys = feats[0].keys() if feats else []
    return ShardRecords(images, {k: np.concatenate([f[k] for f in feats]) for k in keys}, counts, guard,
                show, judge)
