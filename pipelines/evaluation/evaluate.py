"""Stages `evaluate-part` and `evaluate` (paper §4.2, Tables 2-5): RA-CM3, vanilla CM3 and the
retrieval baseline on a COCO-format split, streamed and sharded.

`evaluate-part` takes shards of `shard_images` images (a runner spreads them): each reads its
images in batches of `batch_images`, retrieves, samples and reranks (caption->image by the retrieval
CLIP, image->caption by perplexity), scores perplexities and extracts the judge's features.
`evaluate` is the one reduce step: FID-type score and KID, CLIP score, CIDEr-D, perplexities, each
with a 95% bootstrap interval over test images and paired differences; retrieval recall from
`retrieval-eval`; metrics.json and a Markdown + self-contained HTML report.

No leakage (§3.4): caption->image and image perplexity retrieve with the caption only; image->caption
and caption perplexity retrieve with the image only; memory documents that are near-duplicates of
any evaluation image or caption are excluded from retrieval for every shard (counted in the report).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from pipelines.core.config import ConfigError
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.evaluation import guard, metrics, models, per_image, records, report
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.controls import same_entity_rates
from pipelines.evaluation.fid import (
    FeatureExtractor,
    clip_extractor,
    efficientnet_extractor,
    inception_extractor,
)
from pipelines.evaluation.split import batches
from pipelines.inference.loader import Inference
from pipelines.inference.memory import check_memory, fingerprints, open_memory
from storage.coco import CocoIndex, coco_ref, read_index
from storage.fs import DataRoot
from storage.manifest import read_manifest, upstream_ref

log = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "EvaluatePartStage", "EvaluateStage", "part_ids", "report_path"]


def part_ids(index: CocoIndex, shard_images: int, name: str = "") -> list[str]:
    """Shard ids `[<name>-]<start>-<stop>` over the split's entries (positions in the COCO file)."""
    n = len(index.entries)
    step = shard_images or max(n, 1)
    prefix = f"{name}-" if name else ""
    return [f"{prefix}{s:06d}-{min(s + step, n):06d}" for s in range(0, n, step)]


def part_range(shard_id: str) -> tuple[int, int]:
    a, b = shard_id.split("-")[-2:]
    return int(a), int(b)


def judge(root: DataRoot, setup: Inference, cfg: EvaluateConfig) -> FeatureExtractor:
    """Inception-v3 (true FID) when its weights are given, else EfficientNet-Lite0 (ImageNet,
    plays no other role), or the retrieval CLIP only when asked for (`fid_features = "clip"`)."""
    if cfg.inception_weights:
        return inception_extractor(root.resolve(cfg.inception_weights), cfg.device)
    if cfg.fid_features == "clip":
        return clip_extractor(setup.retriever.encoder, setup.retriever.encoder.info.model)
    return efficientnet_extractor(cfg.device)


def memory_of(root: DataRoot, cfg: EvaluateConfig) -> DataRoot:
    """The memory's data root, checked at plan time (a mismatched memory never starts a shard)."""
    mem = open_memory(root, cfg.memory, "evaluate.memory")
    if mem is not root:
        check_memory(mem, fingerprints(root), "evaluate.memory")
    return mem


REDUCE_ONLY = frozenset({"bootstrap"})


class EvaluatePartStage(Stage):
    """Shards `<start>-<stop>` of the split: per-image records, judge features, report figures."""

    name = "evaluate-part"
    config = EvaluateConfig
    section = "evaluate"  # one set of settings for the shards and the reduce
    version = "2"  # 2: records say whether each generated caption names the image's entity
    description = "one shard of evaluation images: sample, rerank, perplexities, judge features"

    def plan(self, root: DataRoot, cfg: EvaluateConfig) -> list[ShardSpec]:
        names = models.checkpoints(cfg).values()
        inputs = [upstream_ref(root, "train", v) for v in names]
        inputs += [upstream_ref(memory_of(root, cfg), "index", "main"), coco_ref(root, cfg.coco)]
        index = read_index(root, cfg.coco, cfg.image_dir, cfg.max_images)
        if cfg.context == "oracle" and any(e.entity is None for e in index.entries):
            raise ConfigError("evaluate.context", f"\"oracle\" needs the entity of every image, "
                              f"and {cfg.coco} has no racm3_entities for some (demo splits only)")
        return [ShardSpec(self.name, sid, tuple(inputs)) for sid in part_ids(index, cfg.shard_images, cfg.name)]

    def params(self, cfg: EvaluateConfig) -> dict[str, Any]:
        """Fields the reduce step alone reads do not re-run the shards."""
        return {k: v for k, v in cfg.params().items() if k not in REDUCE_ONLY}

    def load(self, cfg: EvaluateConfig) -> dict[str, Any]:
        # Per-worker cache: set-up, judge and leakage guard, filled once by the first shard (the
        # lock: concurrent shards of one worker must not each load the models).
        return {"lock": threading.Lock()}

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: EvaluateConfig = ctx.cfg
        cache: dict[str, Any] = resources if isinstance(resources, dict) else {"lock": threading.Lock()}
        key = (ctx.root.join(), json.dumps(cfg.params(), sort_keys=True, default=str))
        with cache["lock"]:
            if cache.get("key") != key:
                loaded = models.load_models(ctx.root, cfg)
                full = read_index(ctx.root, cfg.coco, cfg.image_dir, cfg.max_images)
                cache.update(key=key, setup=loaded,
                             judge=judge(ctx.root, loaded, cfg) if cfg.generate else None,
                             guard=guard.split_exclusions(ctx.root, loaded.retriever, full, cfg,
                                                          loaded.memory_at))
            setup: Inference = cache["setup"]
            fx: FeatureExtractor | None = cache["judge"]
            grd: dict[str, Any] = cache["guard"]
        index = read_index(ctx.root, cfg.coco, cfg.image_dir, cfg.max_images)
        start, stop = part_range(ctx.spec.shard_id)
        examples, show, fig_dir = [], [], ctx.output_path("figures")
        ctx.root.makedirs(fig_dir)  # committed even when this shard shows no example
        for batch in batches(ctx.root, index, start, stop, cfg.batch_images):
            for ex in per_image.prepare(setup, batch, cfg, grd["excluded"]):
                per_image.run_example(setup, ex, cfg)
                if ex.item.position < cfg.show:
                    show.append(report.showcase(setup, ex, fig_dir, ctx.root))
                examples.append(ex)
        counts = dict(index.counts) | {"usable_images": len(examples)}
        part = records.ShardRecords([records.image_record(ex) for ex in examples],
                            records.features_of(examples, fx.extract) if fx else {}, counts,
                            grd["summary"], show, fx.metric if fx else "")
        records.write_part(ctx.root, ctx.output_path("json"), ctx.output_path("npz"), part)
        skipped = {k.removeprefix("skipped_"): v for k, v in counts.items()
                   if k in records.IMAGE_SKIPS and v}
        return ShardResult(rows_in=stop - start, rows_out=len(examples), dropped=skipped,
                           metrics={"excluded_memory_docs": grd["summary"]["excluded_memory_docs"]})


class EvaluateStage(Stage):
    """One shard `main` (the reduce step): metrics.json, report.md, report.html, figures."""

    name = "evaluate"
    version = "2"
    config = EvaluateConfig
    description = "RA-CM3 vs vanilla CM3 vs retrieval baseline on a COCO split (FID, KID, CIDEr-D, ppl)"

    def plan(self, root: DataRoot, cfg: EvaluateConfig) -> list[ShardSpec]:
        index = read_index(root, cfg.coco, cfg.image_dir, cfg.max_images)
        inputs = [upstream_ref(root, "evaluate-part", sid) for sid in part_ids(index, cfg.shard_images, cfg.name)]
        if read_manifest(root, "retrieval-eval", "main") is not None:
            inputs.append(upstream_ref(root, "retrieval-eval", "main"))
        return [ShardSpec(self.name, cfg.name or "main", tuple(inputs))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: EvaluateConfig = ctx.cfg
        result = reduce(ctx.root, cfg)
        part = result.pop("_part")
        with ctx.root.fs.open(ctx.output_path("metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        report.write_report(ctx, result, part.show, report.loss_curves(ctx.root))
        split = result["split"]
        dropped = {k.removeprefix("skipped_"): v for k, v in split.items()
                   if k.startswith("skipped_") and v}
        flat = {f"{m}/{k}": v for m, d in result["models"].items() for k, v in d.items()}
        return ShardResult(rows_in=split["images_listed"], rows_out=len(part.images),
                           dropped=dropped, metrics=flat | {"excluded_memory_docs":
                                                            result["leakage_guard"]["excluded_memory_docs"]})


def reduce(root: DataRoot, cfg: EvaluateConfig) -> dict[str, Any]:
    """Every part's records -> the metrics (with `_part`, the records, for the report)."""
    index = read_index(root, cfg.coco, cfg.image_dir, cfg.max_images)
    part = records.read_parts(root, part_ids(index, cfg.shard_images, cfg.name))
    if not part.images:
        raise ValueError(f"no usable image in {cfg.coco} (skipped: {part.counts or index.counts}); "
                         f"fix the COCO file or evaluate.image_dir")
    out = metrics.compute(part, cfg.bootstrap, cfg.seed)
    return out | {"fid_features": part.fid_features, "split": part.counts,
                  "context_same_entity": same_entity_rates(part.images),
                  "leakage_guard": part.guard, "retrieval_recall": metrics.retrieval_recall(root),
                  "settings": {"k": cfg.k, "image_samples": cfg.image_samples,
                               "caption_samples": cfg.caption_samples, "images": len(part.images),
                               "coco": cfg.coco, "checkpoints": models.checkpoints(cfg),
                               "context_modality": cfg.context_modality,
                               "context": cfg.context, "memory": cfg.memory,
                               "guidance": cfg.guidance},
                  "_part": part}


def report_path(root: DataRoot) -> str:
    """Where the HTML report is (what the CLI prints after `racm3 demo`)."""
    return root.artifact("evaluate", "main", "report.html")
