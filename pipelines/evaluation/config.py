"""Section [evaluate]: the split, sampling, the leakage guard, the judges, sharding and the bootstrap."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

from pipelines.core.config import StageConfig
from pipelines.evaluation.controls import CONTEXTS

log = logging.getLogger(__name__)

FEATURES = ("efficientnet", "clip")
MODALITIES = ("mixed", "text", "image")


@dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """Shared by `evaluate-part` (per shard of images) and `evaluate` (the reduce step)."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"device", "threads", "batch_images"})
    coco: str = "demo/laion.coco/captions_test.json"  # COCO captions JSON (relative to the root, or absolute): the reported test split
    image_dir: str = ""  # folder of its images ("" = `images/` beside the JSON, or beside it)
    max_images: int = 32  # evaluate the first this many images with captions (0 = all)
    shard_images: int = 64  # images per evaluate-part shard (0 = one shard): the unit a runner spreads
    batch_images: int = 16  # images read, encoded and retrieved together (bounds memory)
    name: str = ""  # output shard: evaluate/<name> and its parts `<name>-<start>-<stop>` ("" = main): one per ablation
    context_modality: str = "mixed"  # retrieved documents in context: "mixed" (caption + image), "text" or "image" only (Table 5)
    generate: bool = True  # sample and rerank (FID-type, KID, CLIP score, CIDEr-D); false: perplexities only (ablations)
    context: str = "retrieved"  # documents in context at inference: "retrieved", "oracle" (demo only: memory documents of the query's entity, never its own) or "random" (Table 5 controls)
    random_context: bool = False  # deprecated: context = "random"
    memory: str = ""  # data root whose index, key map and token shards are the memory ("" = this root's; relative to it, or absolute): made with this root's CLIP, VQGAN and BPE
    ra_checkpoint: str = "ra-cm3"  # train/<name>.pt evaluated as RA-CM3 (ablation variants have their own)
    vanilla_checkpoint: str = "vanilla"  # train/<name>.pt evaluated as vanilla CM3
    k: int = 2  # retrieved documents prepended to each prompt (RA-CM3, retrieval baseline uses the top 1)
    INHERITS: ClassVar[dict[str, str]] = {
        "query_sim_threshold": "retrieve.query_sim_threshold",
        "redundancy_threshold": "retrieve.redundancy_threshold"}
    query_sim_threshold: float | None = None  # retrieval skips a candidate scoring above this with the query (unset = the retrieve stage's)
    redundancy_threshold: float | None = None  # retrieval skips a candidate this similar to a kept one (unset = the retrieve stage's)
    image_samples: int = 4  # images sampled per caption, best kept by CLIP score (paper 10)
    caption_samples: int = 8  # captions sampled per image, lowest perplexity kept (paper 32)
    max_caption_tokens: int = 24  # longest sampled caption
    guidance: float = 0.0  # classifier-free guidance weight of the caption, caption -> image, both models (0 = off): for checkpoints trained with train.caption_dropout > 0
    image_temperature: float = 1.0  # sampling temperature of image tokens
    image_top_p: float = 0.9  # nucleus mass of image tokens
    text_temperature: float = 1.0  # sampling temperature of caption tokens
    text_top_p: float = 0.9  # nucleus mass of caption tokens
    dup_image_threshold: float = 0.98  # memory docs whose image embedding scores above this with an eval image are excluded
    dup_text_threshold: float = 0.98  # memory docs whose caption embedding scores above this with an eval caption are excluded
    fid_features: str = "efficientnet"  # judge of the FID-type score and KID: "efficientnet" (ImageNet, plays no other role) or "clip" (the retriever)
    inception_weights: str = ""  # pytorch-fid's pt_inception-2015-12-05-*.pth (local file): the standard FID instead
    judge_model: str = ""  # open_clip config of the CLIP that gives the CLIP score ("" = the retrieval CLIP's)
    judge_checkpoint: str = ""  # its weights, local file (relative to the root, or absolute); "" = the retrieval CLIP
    bootstrap: int = 1000  # bootstrap resamples over test images for the 95% intervals (0 = none)
    show: int = 4  # examples per grid in the report
    seed: int = 0  # sampling and bootstrap seed
    device: str = "cpu"  # torch device of the models
    threads: int = 1  # torch CPU threads

    def __post_init__(self) -> None:
        self.check(self.max_images >= 0, "max_images", "must be >= 0 (0 = all)")
        self.check(self.shard_images >= 0, "shard_images", "must be >= 0 (0 = one shard)")
        self.check(self.batch_images >= 1, "batch_images", "must be >= 1")
        self.check(self.k >= 1, "k", "must be >= 1 (RA-CM3 needs retrieved documents)")
        self.check(self.image_samples >= 1, "image_samples", "must be >= 1")
        self.check(self.caption_samples >= 1, "caption_samples", "must be >= 1")
        self.check(self.max_caption_tokens >= 1, "max_caption_tokens", "must be >= 1")
        self.check(self.bootstrap >= 0, "bootstrap", "must be >= 0")
        self.check(math.isfinite(self.guidance) and self.guidance >= 0, "guidance",
                   "must be a finite weight >= 0 (0 = off)")
        self._fold_random_context()
        self.check(self.context_modality in MODALITIES, "context_modality", f"must be one of {MODALITIES}")
        self.check(all(c.isalnum() or c in "_." for c in self.name), "name",
                   "letters, digits, '_' and '.' only (it names output shards)")
        self.check(self.fid_features in FEATURES, "fid_features", f"must be one of {FEATURES}")
        for name in ("dup_image_threshold", "dup_text_threshold"):
            self.check(0 < getattr(self, name) <= 1.0001, name, "must be in (0, 1]")
        self.check(0 < self.image_top_p <= 1 and 0 < self.text_top_p <= 1, "image_top_p",
                   "top_p values must be in (0, 1]")
        self._check_judge()

    def _fold_random_context(self) -> None:
        """`random_context = true` (deprecated) means `context = "random"`."""
        self.check(self.context in CONTEXTS, "context", f"must be one of {CONTEXTS}")
        if self.random_context:
            self.check(self.context in ("retrieved", "random"), "random_context",
                       f"is deprecated and contradicts context = {self.context!r}: drop it")
            log.warning('evaluate.random_context is deprecated: set evaluate.context = "random"')
            object.__setattr__(self, "context", "random")

    def _check_judge(self) -> None:
        """A judge CLIP named without weights would score with random ones: refused."""
        self.check(not self.judge_model or bool(self.judge_checkpoint), "judge_checkpoint",
                   f"judge_model = {self.judge_model!r} needs its weights (a local open_clip "
                   "state-dict file); weights are never downloaded")
        if self.judge_model:
            from model.clip_encoder import check_model_name

            try:
                check_model_name(self.judge_model)
            except ValueError as e:
                self.check(False, "judge_model", str(e))
