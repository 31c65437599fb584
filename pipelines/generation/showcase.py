"""`racm3 showcase`: the README's pictures and numbers of §5 from a demo data root, RA-CM3 beside
vanilla CM3 on the test split: infilling (box token match), controlled generation (background
follows the demonstration), guidance (CLIP score and FID-CLIP vs weight); the memory documents it
used, with their origins, in showcase.json and sources.html."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipelines.evaluation.fid import clip_extractor, frechet_distance
from pipelines.generation.controlled import background_control, image_of
from pipelines.generation.fewshot import Split, memory_by_entity, read_entity_split
from pipelines.generation.infill import Box, infill_images
from pipelines.generation.page import render
from pipelines.generation.translate import Context, caption_to_image, clip_scores
from pipelines.inference.guidance import Guidance
from pipelines.inference.loader import Inference, load_inference
from pipelines.inference.sampling import Sampling
from storage.fs import DataRoot
from storage.provenance import SOURCE_HEADER, record_used, source_rows

log = logging.getLogger(__name__)

VARIANTS = ("ra-cm3", "vanilla")
PARAMS = Sampling(1.0, 0, 0.9)


@dataclass(frozen=True)
class ShowcaseConfig:
    coco: str = ""  # labelled COCO split ("" = the demo's test split, else its held-out split)
    images: int = 32  # test images for the measured numbers
    shown: int = 4  # rows in each picture
    samples: int = 2  # samples per prompt (best CLIP kept)
    weights: tuple[float, ...] = (0.0, 1.0, 3.0)  # caption guidance weights (0 = off)
    box: str = ""  # infill box ("" = the centre half of the grid)
    k: int = 2  # documents retrieved with the prompt for RA-CM3
    seed: int = 0
    out: str = "docs/capabilities"
    device: str = "cpu"


# ---------------------------------------------------------------------------- pictures


def montage(rows: list[list[Image.Image]], header: list[str], scale: int = 4) -> Image.Image:
    """Rows of equal-size images, scaled up without smoothing, with column titles."""
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    pad, top = 6, 18
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    for c, title in enumerate(header):
        draw.text((pad + c * (w + pad), 3), title, fill="black")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im.resize((w, h), Image.Resampling.NEAREST), (pad + c * (w + pad), top + r * (h + pad)))
    return out


def grey_box(image: Image.Image, box: Box, grid: int) -> Image.Image:
    img = image.copy()
    cell = img.width // grid
    ImageDraw.Draw(img).rectangle([box.x0 * cell, box.y0 * cell, box.x1 * cell - 1, box.y1 * cell - 1],
                                  fill=(128, 128, 128))
    return img


# ---------------------------------------------------------------------------- experiments


def context_for(bench: Inference, caption: str, k: int, used: set[str]) -> Context:
    """Documents retrieved with the caption (RA-CM3; none for vanilla), noted in `used`."""
    keys = bench.retrieve_by_caption(caption, k) if bench.variant == "ra-cm3" else []
    used.update(keys)
    return Context.of_keys(bench, keys)


def infill_study(bench: Inference, split: Split, names: list[str], cfg: ShowcaseConfig,
                 box: Box, used: set[str]) -> tuple[dict[str, float], list[list[Image.Image]]]:
    """Share of box tokens equal to the true image's tokens, per variant; picture rows."""
    gen = torch.Generator(bench.device).manual_seed(cfg.seed)
    match: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rows = []
    inside = box.inside(bench.grid)
    for i, name in enumerate(names):
        caption, codes = split.captions[name], bench.encode_images([split.images[name]])[0]
        real = bench.decode_codes([codes])[0]
        row = [real, grey_box(real, box, bench.grid)]
        for v in VARIANTS:
            b = bench.use(v)
            ctx = context_for(b, caption, cfg.k, used)
            out = infill_images(b.model, b.vocab, b.encode_caption(caption), codes, b.grid, box,
                                cfg.samples, ctx.docs, PARAMS, gen)
            match[v] += (out[:, inside] == np.asarray(codes)[inside]).mean(1).tolist()
            if i < cfg.shown:
                row.append(b.decode_codes(out[:1])[0])
        if i < cfg.shown:
            rows.append(row)
    return {v: float(np.mean(m)) for v, m in match.items()}, rows


def guidance_study(bench: Inference, split: Split, names: list[str], cfg: ShowcaseConfig,
                   used: set[str]) -> tuple[dict[str, dict[str, dict[str, float]]], list[list[Image.Image]]]:
    """CLIP score and FID-CLIP of the kept image per (variant, weight); picture rows (RA-CM3)."""
    fx = clip_extractor(bench.retriever.encoder, bench.retriever.encoder.info.model)
    real = fx.extract([split.images[n] for n in names])
    out: dict[str, dict[str, dict[str, float]]] = {}
    kept: dict[tuple[str, float], list[Image.Image]] = {}
    for v in VARIANTS:
        b = bench.use(v)
        out[v] = {}
        for w in cfg.weights:
            gen = torch.Generator(bench.device).manual_seed(cfg.seed)
            images, scores = [], []
            for name in names:
                cap = split.captions[name]
                r = caption_to_image(b, cap, context_for(b, cap, cfg.k, used), cfg.samples, PARAMS,
                                     Guidance(caption=w), gen)
                images.append(r.images[0])
                scores.append(float(clip_scores(b, r.images[:1], cap)[0]))
            kept[(v, w)] = images
            out[v][f"{w:g}"] = {"CLIP-score": round(float(np.mean(scores)), 4),
                                fx.metric: round(frechet_distance(fx.extract(images), real), 4)}
            log.info("guidance %s w=%g: %s", v, w, out[v][f"{w:g}"])
    rows = [[kept[("ra-cm3", w)][i] for w in cfg.weights] for i in range(min(cfg.shown, len(names)))]
    return out, rows


def controlled_study(bench: Inference, split: Split, cfg: ShowcaseConfig, used: set[str]
                     ) -> tuple[dict[str, dict[str, float]], list[list[Image.Image]]]:
    keys = memory_by_entity(bench, set(split.images))
    shares, rows = {}, []
    for v in VARIANTS:
        cases, share = background_control(bench.use(v), keys, n_cases=max(cfg.images // 2, cfg.shown),
                                          samples=cfg.samples, seed=cfg.seed)
        shares[v] = share
        used.update(k for c in cases for k in (c.entity_key, c.style_key))
        if v == "ra-cm3":
            rows = [[image_of(bench, c.entity_key), image_of(bench, c.style_key),
                     c.plain[0], c.steered[0]] for c in cases[: cfg.shown]]
    return shares, rows


def run_showcase(root: DataRoot, cfg: ShowcaseConfig) -> dict[str, Any]:
    bench = load_inference(root, VARIANTS, cfg.device)
    split = read_entity_split(root, cfg.coco)
    names = sorted(split.images)[: cfg.images]
    g = bench.grid
    box = Box.parse(cfg.box) if cfg.box else Box(g // 4, g // 4, g - g // 4, g - g // 4)
    os.makedirs(cfg.out, exist_ok=True)
    res: dict[str, Any] = {"split": root.rel(split.path), "images": len(names), "box": box.__dict__,
                           "samples": cfg.samples, "k": cfg.k}
    used: set[str] = set()
    res["infill_box_token_match"], rows = infill_study(bench, split, names, cfg, box, used)
    montage(rows, ["image (tokens)", "masked", "RA-CM3", "vanilla"]).save(f"{cfg.out}/infill.png")
    res["controlled_background_share"], rows = controlled_study(bench, split, cfg, used)
    if rows:
        montage(rows, ["entity doc", "style doc", "no style", "with style"]).save(f"{cfg.out}/controlled.png")
    res["guidance"], rows = guidance_study(bench, split, names, cfg, used)
    montage(rows, [f"w={w:g}" for w in cfg.weights]).save(f"{cfg.out}/guidance.png")
    write_sources(bench, res, sorted(used), cfg.out)
    with open(f"{cfg.out}/showcase.json", "w") as f:
        json.dump(res, f, indent=1)
    record_used(bench.memory_at, "showcase", os.path.abspath(f"{cfg.out}/showcase.json"), sorted(used))
    return res


def write_sources(bench: Inference, res: dict[str, Any], keys: list[str], out: str) -> None:
    """The memory documents the pictures used, with their origins: into `res` and sources.html."""
    rows = source_rows(bench.memory_at, keys)
    res["documents"], res["memory"] = keys, bench.memory_at.uri
    res["sources"] = [dict(zip(SOURCE_HEADER, r, strict=True)) for r in rows]
    with open(f"{out}/sources.html", "w") as f:
        f.write(render("racm3 showcase: sources", [], f"{len(keys)} memory documents used",
                       sources=(SOURCE_HEADER, rows)))
