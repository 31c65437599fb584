"""`racm3 generate`: one request (caption -> image, image -> caption or infilling) run against a
data root's trained checkpoint; writes PNGs / captions, result.json and a self-contained page."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from pipelines.generation.ensemble import ensemble_images
from pipelines.generation.infill import Box, infill_images
from pipelines.generation.page import Figure, Section, render
from pipelines.generation.translate import (
    Context,
    Ranked,
    caption_to_image,
    image_to_caption,
    rank_images,
)
from pipelines.inference.guidance import Guidance
from pipelines.inference.loader import Inference, load_inference
from pipelines.inference.retrieval import inference_rule, parse_sets
from pipelines.inference.sampling import Sampling
from storage.fs import DataRoot
from storage.provenance import SOURCE_HEADER, record_used, source_rows

log = logging.getLogger(__name__)

MODES = ("caption-to-image", "image-to-caption", "infill")


@dataclass(frozen=True)
class Request:
    """What to generate and how; `mode` follows from which of caption / image / box is given."""

    caption: str = ""  # the prompt caption (caption -> image, infilling)
    image: str = ""  # path of the prompt image (image -> caption, infilling)
    box: str = ""  # x0,y0,x1,y1 in token-grid cells: infill this box of `image`
    variant: str = "ra-cm3"  # which trained checkpoint (train/<variant>.pt)
    k: int = -1  # documents retrieved with the prompt when none are named (-1: 2, vanilla 0)
    context_keys: tuple[str, ...] = ()  # memory documents to use instead of retrieval
    context_images: tuple[str, ...] = ()  # user documents' images ...
    context_captions: tuple[str, ...] = ()  # ... and their captions (same count)
    samples: int = 4  # outputs sampled, then reranked (CLIP score / perplexity)
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.9
    max_caption_tokens: int = 24
    min_caption_tokens: int = 1  # no empty captions (an untrained model often ends at once)
    guidance_caption: float = 0.0  # classifier-free guidance weight of the caption (0 = off)
    guidance_documents: float = 0.0  # guidance weight of the in-context documents (0 = off)
    ensemble: int = 0  # caption -> image: this many documents as an ensemble of 2-document passes (0 = off)
    out: str = "generated"  # output folder
    device: str = "cpu"
    sets: tuple[str, ...] = ()  # `retrieve.<field>=value` / `embed.model=NAME`: retrieval settings (default: the retrieve stage's)
    memory: str = ""  # another data root whose index, key map and token shards are the memory ("" = this root's)

    @property
    def mode(self) -> str:
        if self.box:
            return "infill"
        return "image-to-caption" if self.image and not self.caption else "caption-to-image"

    def check(self) -> None:
        if self.mode == "infill" and not (self.image and self.caption):
            raise ValueError("--infill needs --image FILE and --caption TEXT")
        if not self.caption and not self.image:
            raise ValueError("give --caption TEXT (caption -> image) or --image FILE (image -> caption)")
        if len(self.context_images) != len(self.context_captions):
            raise ValueError(f"{len(self.context_images)} --context-image but "
                             f"{len(self.context_captions)} --context-caption: give them in pairs")
        if self.samples < 1:
            raise ValueError("--samples must be >= 1")
        if not 0 <= self.min_caption_tokens <= self.max_caption_tokens:
            raise ValueError("--min-caption-tokens must be in [0, --max-caption-tokens]")
        if self.ensemble and (self.mode != "caption-to-image" or self.guidance_caption
                              or self.guidance_documents):
            raise ValueError("--ensemble is for caption -> image without guidance")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, 0, self.top_p)


def open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def resolve_context(bench: Inference, req: Request, image: Image.Image | None) -> Context:
    """Named documents when given, else documents retrieved with the prompt alone (no leakage:
    the caption for caption -> image and infilling, the image for image -> caption)."""
    user = Context.of_keys(bench, req.context_keys)
    for path, cap in zip(req.context_images, req.context_captions, strict=True):
        user = user + Context([bench.document(cap, open_image(path))], [f"user: {os.path.basename(path)}"])
    if user.docs:
        return user
    k = req.k if req.k >= 0 else (0 if req.variant == "vanilla" else 2)
    k = max(k, req.ensemble)
    if req.mode == "image-to-caption" and image is not None:
        keys = bench.retrieve_by_image(image, k)
    else:
        keys = bench.retrieve_by_caption(req.caption, k)
    return Context.of_keys(bench, keys)


def run(bench: Inference, req: Request) -> tuple[Ranked, Context, Image.Image | None]:
    req.check()
    image = open_image(req.image) if req.image else None
    context = resolve_context(bench, req, image)
    gen = torch.Generator(bench.device).manual_seed(req.seed)
    if req.mode == "image-to-caption":
        assert image is not None
        return image_to_caption(bench, image, context, req.samples, req.max_caption_tokens,
                                req.sampling, gen, req.min_caption_tokens), context, image
    if req.mode == "infill":
        assert image is not None
        box = Box.parse(req.box)
        codes = bench.encode_images([image])[0]
        out = infill_images(bench.model, bench.vocab, bench.encode_caption(req.caption), codes,
                            bench.grid, box, req.samples, context.docs, req.sampling, gen)
        return rank_images(bench, out, req.caption), context, image
    if req.ensemble:
        drawn = ensemble_images(bench.model, bench.vocab, bench.encode_caption(req.caption),
                                bench.grid, req.samples, context.docs, req.ensemble, 2,
                                req.sampling, gen)
        return rank_images(bench, drawn, req.caption), context, None
    guidance = Guidance(req.guidance_caption, req.guidance_documents)
    return caption_to_image(bench, req.caption, context, req.samples, req.sampling, guidance,
                            gen), context, None


def write(bench: Inference, req: Request, ranked: Ranked, context: Context,
          image: Image.Image | None, log_used: bool = False) -> dict[str, Any]:
    """PNGs / captions.txt, result.json and index.html under req.out; returns the result record.
    The memory documents used and their origins go into both; with `log_used`, the page and its
    documents are logged in the memory's data root (`racm3 status` / `lineage` flag the page
    when one of them is removed later)."""
    os.makedirs(req.out, exist_ok=True)
    files = []
    for i, im in enumerate(ranked.images):
        files.append(p := os.path.join(req.out, f"sample_{i}.png"))
        im.save(p)
    if ranked.captions:
        files.append(p := os.path.join(req.out, "captions.txt"))
        with open(p, "w") as f:
            f.write("\n".join(ranked.captions) + "\n")
    keys = [s for s in context.sources if not s.startswith("user: ")]  # memory documents
    sources = source_rows(bench.memory_at, keys)
    record = {"mode": req.mode, "request": asdict(req), "context": context.sources,
              "score": ranked.score_name, "scores": ranked.scores, "captions": ranked.captions,
              "files": files, "documents": keys, "memory": bench.memory_at.uri,
              "sources": [dict(zip(SOURCE_HEADER, r, strict=True)) for r in sources]}
    with open(os.path.join(req.out, "result.json"), "w") as f:
        json.dump(record, f, indent=1)
    page = os.path.join(req.out, "index.html")
    with open(page, "w") as f:
        f.write(render(f"racm3 generate: {req.mode} ({req.variant})", [section(bench, req, ranked, context, image)],
                       notes=f"seed {req.seed}, temperature {req.temperature}, top-p {req.top_p}",
                       sources=(SOURCE_HEADER, sources)))
    record["page"] = page
    if log_used:
        record_used(bench.memory_at, "generate", os.path.abspath(page), keys)
    return record


def section(bench: Inference, req: Request, ranked: Ranked, context: Context,
            image: Image.Image | None) -> Section:
    prompt = []
    if req.caption:
        prompt.append(Figure("caption", text=req.caption))
    if image is not None:
        shown = bench.decode_codes([bench.encode_images([image])[0]])[0]
        prompt.append(Figure(f"image (as tokens){', box ' + req.box if req.box else ''}", shown))
    ctx = []
    for src, doc in zip(context.sources, context.docs, strict=True):
        cap, im = bench.parts(doc)
        ctx.append(Figure(src, im, cap))
    label = ranked.score_name
    if ranked.images:
        outs = [Figure(f"{label} {s:.3f}", im) for im, s in zip(ranked.images, ranked.scores, strict=True)]
    else:
        outs = [Figure(f"{label} {s:.2f}", text=c) for c, s in zip(ranked.captions, ranked.scores, strict=True)]
    return Section(req.caption or os.path.basename(req.image), prompt, ctx, outs)


def generate(root: DataRoot, req: Request) -> dict[str, Any]:
    """Load the checkpoint, run the request, write its outputs; the result record."""
    overrides, encoder = parse_sets(list(req.sets))
    rule = inference_rule(root, overrides, encoder)
    bench = load_inference(root, (req.variant,), req.device, rule, memory=req.memory)
    ranked, context, image = run(bench, req)
    return write(bench, req, ranked, context, image, log_used=True)
