"""Stage `evaluate` (paper §4.2, Tables 2-5): RA-CM3, vanilla CM3 and the retrieval baseline on a
COCO-format split: caption->image (CLIP-reranked samples, FID), image->caption (perplexity-reranked
samples, CIDEr-D), image/text perplexity with and without retrieval, retrieval recall; metrics JSON
and a Markdown + self-contained HTML report.

No leakage (§3.4): caption->image and image perplexity retrieve with the caption only; image->caption
and caption perplexity retrieve with the image only; memory documents that are near-duplicates of
an evaluation image or caption are excluded from retrieval (counted in the report).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from model.clip_encoder import decode_image, resolve_device
from model.document import Vocab
from model.images import to_tensor
from model.transformer import Transformer
from pipelines.core.config import StageConfig
from pipelines.core.registry import config_of
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.evaluation.cider import cider_d
from pipelines.evaluation.fid import (
    FeatureExtractor,
    clip_extractor,
    frechet_distance,
    inception_extractor,
)
from pipelines.evaluation.generate import Sampling, caption_nll, generate_captions, generate_images
from pipelines.evaluation.perplexity import HeldOutExample, heldout_perplexity
from pipelines.retrieval.faiss_index import LoadedIndex, vectors
from pipelines.retrieval.search import Retriever, select_neighbors
from pipelines.tokens.tokenizers import Tokenizers, load_tokenizers
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import LineageError, load_tokens
from storage.coco import coco_ref, iter_images, read_index
from storage.fs import DataRoot
from storage.manifest import list_manifests, read_manifest, upstream_ref
from storage.shards import read_table

log = logging.getLogger(__name__)

MODELS = ("ra-cm3", "vanilla", "retrieval-baseline")
GENERATORS = ("ra-cm3", "vanilla")


@dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """Section [evaluate]: which split, how many samples per prompt, the leakage guard, FID features."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"device", "threads"})
    coco: str = "demo/laion.coco/captions_val.json"  # COCO captions JSON (relative to the root, or absolute)
    image_dir: str = ""  # folder of its images ("" = `images/` beside the JSON, or beside it)
    max_images: int = 32  # evaluate the first this many usable images (0 = all)
    k: int = 2  # retrieved documents prepended to each prompt (RA-CM3, retrieval baseline uses the top 1)
    image_samples: int = 4  # images sampled per caption, best kept by CLIP score (paper 10)
    caption_samples: int = 8  # captions sampled per image, lowest perplexity kept (paper 32)
    max_caption_tokens: int = 24  # longest sampled caption
    image_temperature: float = 1.0  # sampling temperature of image tokens
    image_top_p: float = 0.9  # nucleus mass of image tokens
    text_temperature: float = 1.0  # sampling temperature of caption tokens
    text_top_p: float = 0.9  # nucleus mass of caption tokens
    dup_image_threshold: float = 0.98  # memory docs whose image embedding scores above this with an eval image are excluded
    dup_text_threshold: float = 0.98  # memory docs whose caption embedding scores above this with an eval caption are excluded
    inception_weights: str = ""  # torchvision Inception-v3 state dict (local file) for standard FID; "" = FID-CLIP substitute
    show: int = 4  # examples per grid in the report
    seed: int = 0  # sampling seed
    device: str = "cpu"  # torch device of the models
    threads: int = 1  # torch CPU threads

    def __post_init__(self) -> None:
        self.check(self.max_images >= 0, "max_images", "must be >= 0 (0 = all)")
        self.check(self.k >= 1, "k", "must be >= 1 (RA-CM3 needs retrieved documents)")
        self.check(self.image_samples >= 1, "image_samples", "must be >= 1")
        self.check(self.caption_samples >= 1, "caption_samples", "must be >= 1")
        self.check(self.max_caption_tokens >= 1, "max_caption_tokens", "must be >= 1")
        for name in ("dup_image_threshold", "dup_text_threshold"):
            self.check(0 < getattr(self, name) <= 1.0001, name, "must be in (0, 1]")
        self.check(0 < self.image_top_p <= 1 and 0 < self.text_top_p <= 1, "image_top_p",
                   "top_p values must be in (0, 1]")


# ---------------------------------------------------------------------------- the split


@dataclass
class SplitItem:
    """One usable evaluation image with its (non-empty) reference captions."""

    image_id: int
    image: Image.Image  # RGB, as stored
    captions: list[str]


def read_split(root: DataRoot, coco: str, image_dir: str = "",
               max_images: int = 0) -> tuple[list[SplitItem], dict[str, int]]:
    """Usable images of a COCO captions file and counts of what was skipped and why
    (storage.coco's rules, shared with retrieval-eval and fit-clip)."""
    index = read_index(root, coco, image_dir, max_images)
    items = [SplitItem(it.entry.image_id, image, it.entry.captions)
             for it in iter_images(root, index) if (image := decode_image(it.data)) is not None]
    index.counts["usable_images"] = len(items)
    return items, index.counts


# ---------------------------------------------------------------------------- set-up and lineage


@dataclass
class Setup:
    """Everything the evaluation reads: tokenizers, retriever, both models, the memory's tokens."""

    tok: Tokenizers
    tok_cfg: Any  # the tokenize section the token shards were made with
    retriever: Retriever
    models: dict[str, Transformer]
    vocab: Vocab
    memory: dict[str, np.ndarray]  # key -> encoded document ids
    memory_captions: dict[str, str]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return self.tok_cfg.grid


def tokenize_config(root: DataRoot) -> Any:
    """The tokenizer configuration the token shards were made with (from their manifest)."""
    return config_of(root, "tokenize")


def retrieve_config(root: DataRoot, k: int) -> Any:
    """The retrieve stage's thresholds (as the training neighbours used), keeping k neighbours."""
    cfg = config_of(root, "retrieve", missing_ok=True)
    return replace(cfg, k_max=k, top_n=max(cfg.top_n, k + 1), use_gpu=False)


def check_lineage(variant: str, lineage: dict[str, Any], codebook: str, text_fp: str,
                  index: LoadedIndex) -> None:
    """Refuse a checkpoint trained on another codebook, text tokenizer or (RA-CM3) index."""
    want = {"codebook": codebook, "text_tokenizer": text_fp}
    if "index_fingerprint" in lineage or variant == "ra-cm3":
        want["index_fingerprint"] = index.digest
    for name, value in want.items():
        if lineage.get(name) != value:
            raise LineageError(
                f"the {variant} checkpoint was trained with {name} {lineage.get(name)!r} but the "
                f"evaluation's retriever/tokenizer has {value!r}: re-run `racm3 run train --set "
                f"train.variant={variant}` on the current tokens and index, or evaluate the data "
                f"root the checkpoint was trained in")


def load_setup(root: DataRoot, cfg: EvaluateConfig) -> Setup:
    tok_cfg = tokenize_config(root)
    tok = load_tokenizers(root, tok_cfg)
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    retriever = Retriever(root, retrieve_config(root, cfg.k), device)
    vocab, memory, mem_lineage = load_tokens(root)
    models, records = {}, {}
    for variant in GENERATORS:
        model, v, rec = load_trained(root, variant, device)
        check_lineage(variant, rec["lineage"], tok.codebook, tok.text_fp, retriever.index)
        if v != vocab or mem_lineage["codebook"] != tok.codebook:
            raise LineageError(f"the {variant} checkpoint's vocabulary {v} differs from the token "
                               f"shards' {vocab}: re-run tokenize and train together")
        models[variant], records[variant] = model, rec
    return Setup(tok, tok_cfg, retriever, models, vocab, memory, memory_captions(root), records)


def memory_captions(root: DataRoot) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in list_manifests(root, "tokenize"):
        t = read_table(root, root.artifact("tokenize", m.shard_id, "parquet"), ["key", "caption"])
        out.update(zip(t["key"].to_pylist(), (c or "" for c in t["caption"].to_pylist()), strict=True))
    return out


# ---------------------------------------------------------------------------- leakage guard


def near_duplicates(root: DataRoot, image_emb: np.ndarray, text_emb: np.ndarray,
                    image_thr: float, text_thr: float) -> dict[str, set[str]]:
    """Memory keys whose image (text) embedding scores above the threshold with any evaluation
    image (caption); streamed shard by shard over the embed shards."""
    out: dict[str, set[str]] = {"image": set(), "text": set()}
    for m in list_manifests(root, "embed"):
        t = read_table(root, root.artifact("embed", m.shard_id, "parquet"),
                       ["key", "text_emb", "image_emb"])
        keys = np.asarray(t["key"].to_pylist(), dtype=object)
        for kind, q, thr in (("image", image_emb, image_thr), ("text", text_emb, text_thr)):
            mem = vectors(t, f"{kind}_emb")  # (N, D), zeros where the part is missing
            if len(q) and len(mem):
                hit = (q @ mem.T).max(axis=0) > thr  # (N,)
                out[kind].update(keys[hit].tolist())
    return out


def guarded_search(retriever: Retriever, vecs: np.ndarray, excluded: set[str],
                   k: int) -> list[list[str]]:
    """Neighbour keys per query (best first, redundancy rules as in training), never a key in
    `excluded` (treated like the query's own document)."""
    index, cfg = retriever.index, retriever.cfg
    n = min(cfg.top_n + len(excluded), index.cpu.ntotal)
    scores, ids = index.search(vecs, n)
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    uniq, inv = np.unique(safe, return_inverse=True)
    cand = index.reconstruct(uniq)[inv.reshape(safe.shape)]  # (Q, N, D)
    banned = valid & np.vectorize(excluded.__contains__, otypes=[bool])(index.keys[safe])
    sel = select_neighbors(scores, cand, valid, banned, np.zeros_like(valid), k,
                           cfg.query_sim_threshold, cfg.redundancy_threshold)
    return [index.keys[ids[r, sel.kept[r][sel.kept[r] >= 0]]].tolist() for r in range(len(vecs))]


# ---------------------------------------------------------------------------- per-image work


@dataclass
class Example:
    """One evaluation image: its prompts, what was retrieved for each, what each model made."""

    item: SplitItem
    real: Image.Image  # the image at the models' resolution (the FID reference)
    codes: list[int]  # its VQGAN codes
    caption_ids: list[int]  # its first caption, tokenized
    by_caption: list[str]  # memory keys retrieved with the caption
    by_image: list[str]  # memory keys retrieved with the image
    images: dict[str, Image.Image] = field(default_factory=dict)  # model -> kept image
    clip: dict[str, float] = field(default_factory=dict)  # model -> CLIP score of the kept image
    captions: dict[str, str] = field(default_factory=dict)  # model -> kept caption

    @property
    def caption(self) -> str:
        return self.item.captions[0]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, R, R) in [-1, 1] -> PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def decode_codes(setup: Setup, codes: np.ndarray) -> list[Image.Image]:
    """(B, g*g) raw codes -> PIL images through the VQGAN decoder."""
    g = setup.grid
    return to_pil(setup.tok.vqgan.decode(torch.as_tensor(codes, dtype=torch.long).view(-1, g, g)))


def prepare(setup: Setup, items: list[SplitItem], cfg: EvaluateConfig,
            excluded: set[str]) -> list[Example]:
    """Encode every item (codes, caption ids) and retrieve with the caption and with the image."""
    size = setup.tok_cfg.image_size
    reals = [at_size(it.image, size) for it in items]  # (R, R, 3) uint8 each
    codes = setup.tok.vqgan.encode(to_tensor(np.stack(reals))).flatten(1).tolist()
    enc = setup.retriever.encoder
    by_cap = guarded_search(setup.retriever, enc.encode_text([it.captions[0] for it in items]),
                            excluded, cfg.k)
    by_img = guarded_search(setup.retriever, enc.encode_image([it.image for it in items]),
                            excluded, cfg.k)
    limit = setup.tok_cfg.max_caption_tokens
    return [Example(it, Image.fromarray(r), c, setup.tok.text.encode(it.captions[0])[:limit], bc, bi)
            for it, r, c, bc, bi in zip(items, reals, codes, by_cap, by_img, strict=True)]


def at_size(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8, resized as `model.images.load_image` resizes the training images."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def context(setup: Setup, keys: list[str], variant: str, k: int) -> list[np.ndarray]:
    return [setup.memory[key] for key in keys[:k] if key in setup.memory] if variant == "ra-cm3" else []


def caption_to_image(setup: Setup, ex: Example, variant: str, cfg: EvaluateConfig,
                     gen: torch.Generator) -> None:
    """Sample N images for the caption, keep the one the CLIP encoder scores best with it."""
    params = Sampling(cfg.image_temperature, 0, cfg.image_top_p)
    codes = generate_images(setup.models[variant], setup.vocab, ex.caption_ids, setup.grid,
                            cfg.image_samples, context(setup, ex.by_caption, variant, cfg.k),
                            params, gen)  # (N, g*g)
    images = decode_codes(setup, codes)
    enc = setup.retriever.encoder
    scores = enc.encode_image(images) @ enc.encode_text([ex.caption])[0]  # (N,)
    best = int(np.argmax(scores))
    ex.images[variant], ex.clip[variant] = images[best], float(scores[best])


def image_to_caption(setup: Setup, ex: Example, variant: str, cfg: EvaluateConfig,
                     gen: torch.Generator) -> None:
    """Sample M captions for the image (infilling), keep the lowest-perplexity one."""
    model, ctx_docs = setup.models[variant], context(setup, ex.by_image, variant, cfg.k)
    params = Sampling(cfg.text_temperature, 0, cfg.text_top_p)
    caps = generate_captions(model, setup.vocab, ex.codes, cfg.caption_samples,
                             cfg.max_caption_tokens, ctx_docs, params, gen)
    nll = caption_nll(model, setup.vocab, ex.codes, caps, ctx_docs)
    best = int(np.argmin(nll))
    ex.captions[variant] = setup.tok.text.decode(caps[best]) if math.isfinite(nll[best]) else ""


def retrieval_baseline(setup: Setup, ex: Example) -> None:
    """The paper's baseline: the top document retrieved with the prompt is the output."""
    if ex.by_caption and ex.by_caption[0] in setup.memory:
        _, img = setup.vocab.decode(setup.memory[ex.by_caption[0]].tolist())
        ex.images["retrieval-baseline"] = decode_codes(setup, np.asarray([img]))[0]
    if ex.by_image:
        ex.captions["retrieval-baseline"] = setup.memory_captions.get(ex.by_image[0], "")


# ---------------------------------------------------------------------------- metrics


def fid_extractor(root: DataRoot, setup: Setup, cfg: EvaluateConfig) -> FeatureExtractor:
    """Inception-v3 (standard FID) when its weights are configured, else the labelled CLIP substitute."""
    if cfg.inception_weights:
        return inception_extractor(root.resolve(cfg.inception_weights), cfg.device)
    return clip_extractor(setup.retriever.encoder, setup.retriever.encoder.info.model)


def image_metrics(examples: list[Example], model: str, fx: FeatureExtractor,
                  real_feats: np.ndarray) -> dict[str, Any]:
    """FID-type distance and mean CLIP score of the kept images; nothing when there are none."""
    kept = [ex for ex in examples if model in ex.images]
    out: dict[str, Any] = {"caption_to_image_n": len(kept)}
    if len(kept) >= 2:
        out[fx.metric] = round(frechet_distance(fx.extract([ex.images[model] for ex in kept]),
                                                real_feats), 4)
    clips = [ex.clip[model] for ex in kept if model in ex.clip]
    if clips:
        out["CLIP-score"] = round(float(np.mean(clips)), 4)
    return out


def caption_metrics(examples: list[Example], model: str) -> dict[str, Any]:
    kept = [ex for ex in examples if model in ex.captions]
    out: dict[str, Any] = {"image_to_caption_n": len(kept)}
    if kept:
        score, _ = cider_d({i: ex.captions[model] for i, ex in enumerate(kept)},
                           {i: ex.item.captions for i, ex in enumerate(kept)})
        out["CIDEr-D"] = round(100 * score, 2)  # x100 as the paper's tables report it
    return out


def perplexity_metrics(setup: Setup, examples: list[Example], variant: str,
                       k: int) -> dict[str, Any]:
    """Table 5: image ppl given documents retrieved by the caption, caption ppl given documents
    retrieved by the image; RA-CM3 also without retrieval. Zero-token results are left out."""
    held = [HeldOutExample(setup.vocab.encode(ex.caption_ids, ex.codes),
                           by_caption=[list(setup.memory[x]) for x in ex.by_caption if x in setup.memory],
                           by_image=[list(setup.memory[x]) for x in ex.by_image if x in setup.memory])
            for ex in examples if ex.caption_ids]
    runs = {"": variant == "ra-cm3"} | ({" (no retrieval)": False} if variant == "ra-cm3" else {})
    out: dict[str, Any] = {}
    for suffix, with_retrieval in runs.items():
        ppl = heldout_perplexity(setup.models[variant], setup.vocab, held, with_retrieval, k)
        if ppl["image_tokens"]:
            out[f"image ppl{suffix}"] = round(ppl["image_ppl"], 4)
        if ppl["text_tokens"]:
            out[f"text ppl{suffix}"] = round(ppl["text_ppl"], 4)
    out["perplexity_n"] = len(held)
    return out


def retrieval_recall(root: DataRoot) -> dict[str, Any] | None:
    """Table 4 from the retrieval-eval stage, when it has run."""
    path = root.artifact("retrieval-eval", "main", "json")
    if not root.exists(path):
        return None
    with root.fs.open(path, "r") as f:
        data = json.load(f)
    keep = ("text_to_image", "text_to_mixture", "image_to_text", "image_to_mixture", "chance",
            "n_images")
    return {k: data[k] for k in keep if k in data}


# ---------------------------------------------------------------------------- the stage


def evaluate(root: DataRoot, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[Example], Setup]:
    """Run every evaluation; returns (metrics, examples, set-up) for the report."""
    setup = load_setup(root, cfg)
    items, counts = read_split(root, cfg.coco, cfg.image_dir, cfg.max_images)
    if not items:
        raise ValueError(f"no usable image in {cfg.coco} (skipped: {counts}); fix the COCO file "
                         f"or evaluate.image_dir")
    enc = setup.retriever.encoder
    img_emb = enc.encode_image([it.image for it in items])
    txt_emb = enc.encode_text([c for it in items for c in it.captions])
    dups = near_duplicates(root, img_emb, txt_emb, cfg.dup_image_threshold, cfg.dup_text_threshold)
    excluded = dups["image"] | dups["text"]
    examples = prepare(setup, items, cfg, excluded)
    device = next(setup.models["ra-cm3"].parameters()).device
    for i, ex in enumerate(examples):
        for j, variant in enumerate(GENERATORS):
            gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + i * 2 + j)
            caption_to_image(setup, ex, variant, cfg, gen)
            image_to_caption(setup, ex, variant, cfg, gen)
        retrieval_baseline(setup, ex)
    fx = fid_extractor(root, setup, cfg)
    real_feats = fx.extract([ex.real for ex in examples])
    models: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        models[model] = image_metrics(examples, model, fx, real_feats) | caption_metrics(examples, model)
        if model in GENERATORS:
            models[model] |= perplexity_metrics(setup, examples, model, cfg.k)
    metrics = {"models": models, "fid_features": fx.metric, "split": counts,
               "leakage_guard": {"excluded_memory_docs": len(excluded),
                                 "image_near_duplicates": len(dups["image"]),
                                 "text_near_duplicates": len(dups["text"]),
                                 "image_threshold": cfg.dup_image_threshold,
                                 "text_threshold": cfg.dup_text_threshold},
               "retrieval_recall": retrieval_recall(root),
               "settings": {"k": cfg.k, "image_samples": cfg.image_samples,
                            "caption_samples": cfg.caption_samples, "images": len(examples)}}
    return metrics, examples, setup


class EvaluateStage(Stage):
    """One shard `main`: metrics.json, report.md, report.html and the report's figures."""

    name = "evaluate"
    version = "1"
    config = EvaluateConfig
    description = "RA-CM3 vs vanilla CM3 vs retrieval baseline on a COCO split (FID, CIDEr-D, ppl)"

    def plan(self, root: DataRoot, cfg: EvaluateConfig) -> list[ShardSpec]:
        inputs = [upstream_ref(root, "train", v) for v in GENERATORS]
        inputs += [upstream_ref(root, "index", "main"), coco_ref(root, cfg.coco)]
        if read_manifest(root, "retrieval-eval", "main") is not None:
            inputs.append(upstream_ref(root, "retrieval-eval", "main"))
        return [ShardSpec(self.name, "main", tuple(inputs))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        from pipelines.evaluation.report import loss_curves, write_report

        cfg: EvaluateConfig = ctx.cfg
        metrics, examples, setup = evaluate(ctx.root, cfg)
        with ctx.root.fs.open(ctx.output_path("metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        write_report(ctx, metrics, examples, setup, loss_curves(ctx.root), cfg.show)
        split = metrics["split"]
        dropped = {k.removeprefix("skipped_"): v for k, v in split.items()
                   if k.startswith("skipped_") and v}
        flat = {f"{m}/{k}": v for m, d in metrics["models"].items() for k, v in d.items()}
        return ShardResult(rows_in=split["images_listed"], rows_out=len(examples), dropped=dropped,
                           metrics=flat | {"excluded_memory_docs":
                                           metrics["leakage_guard"]["excluded_memory_docs"]})


def report_path(root: DataRoot) -> str:
    """Where the HTML report is (what the CLI prints after `racm3 demo`)."""
    return root.artifact("evaluate", "main", "report.html")
