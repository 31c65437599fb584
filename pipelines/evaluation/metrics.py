"""The reduce step's numbers: per model the FID-type score, KID, CLIP score, CIDEr-D and
perplexities, each with a 95% bootstrap interval over test images, and paired differences."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.evaluation.cider import cider_d
from pipelines.evaluation.controls import caption_entity_rate
from pipelines.evaluation.fid import (
    frechet_distance,
    frechet_from_grams,
    kid_from_kernels,
    polynomial_kernel,
)
from pipelines.evaluation.models import MODELS
from pipelines.evaluation.records import ShardRecords
from pipelines.evaluation.stats import Interval, bootstrap, paired_difference, resamples
from storage.fs import DataRoot

Stat = Callable[[np.ndarray], float]
PAIRS = (("ra-cm3", "vanilla"), ("ra-cm3", "retrieval-baseline"))
CAPTION_ENTITY = "caption same-entity %"  # share of generated captions naming the image's entity (demo)
PPL = {"image ppl": ("image", ""), "text ppl": ("text", ""),
       "text ppl (caption first)": ("text_first", "")}  # name -> (nll part, run suffix)


def image_stats(part: ShardRecords, model: str) -> dict[str, Stat]:
    """FID-type and KID over the rows where the model made an image; the CLIP score mean."""
    out: dict[str, Stat] = {}
    gen, real = part.features.get(model), part.features.get("real")
    if gen is None or real is None:  # perplexity-only run (evaluate.generate = false)
        return out
    ok = ~np.isnan(gen).any(axis=1)
    if ok.sum() >= 2:
        g0, r0 = np.nan_to_num(gen).astype(np.float64), real.astype(np.float64)
        kgg, krr, kgr = polynomial_kernel(g0, g0), polynomial_kernel(r0, r0), polynomial_kernel(g0, r0)
        ggg, grr, ggr = g0 @ g0.T, r0 @ r0.T, g0 @ r0.T  # Grams: each draw is O(n^2), not O(n^2 D)

        def fid(idx: np.ndarray) -> float:
            g = idx[ok[idx]]
            if len(g) < 2:
                return math.nan
            if len(idx) == len(ok) and (idx == np.arange(len(ok))).all():  # the point estimate
                return frechet_distance(gen[g], real[idx])
            return frechet_from_grams(ggg[np.ix_(g, g)], grr[np.ix_(idx, idx)], ggr[np.ix_(g, idx)])

        def kid(idx: np.ndarray) -> float:
            g = idx[ok[idx]]
            if len(g) < 2:
                return math.nan
            return kid_from_kernels(kgg[np.ix_(g, g)], krr[np.ix_(idx, idx)], kgr[np.ix_(g, idx)])

        out[part.fid_features], out[f"KID({part.fid_features.removeprefix('FID-')})"] = fid, kid
    clip = np.array([r["clip"].get(model, math.nan) for r in part.images], np.float64)
    if np.isfinite(clip).any():
        out["CLIP-score"] = lambda idx: float(np.nanmean(clip[idx])) if np.isfinite(clip[idx]).any() else math.nan
    return out


def caption_stats(part: ShardRecords, model: str) -> dict[str, Stat]:
    rows = [i for i, r in enumerate(part.images) if model in r["captions"]]
    if not rows:
        return {}
    _, per = cider_d({i: part.images[i]["captions"][model] for i in rows},
                     {i: part.images[i]["refs"] for i in rows})  # df from these references
    score = np.full(len(part.images), np.nan)
    score[rows] = [per[i] for i in rows]
    return {"CIDEr-D": lambda idx: 100 * float(np.nanmean(score[idx]))
            if np.isfinite(score[idx]).any() else math.nan}  # x100 as the paper's tables


def entity_stats(part: ShardRecords, model: str) -> dict[str, Stat]:
    """% of the model's generated captions that name the test image's entity (demo splits know
    each image's entity; absent elsewhere)."""
    hit = caption_entity_rate(part.images, model)  # (n,) 1 / 0 / NaN
    if not np.isfinite(hit).any():
        return {}
    return {CAPTION_ENTITY: lambda idx: 100 * float(np.nanmean(hit[idx]))
            if np.isfinite(hit[idx]).any() else math.nan}


def ppl_stats(part: ShardRecords, model: str) -> dict[str, Stat]:
    """exp(summed NLL / tokens) over the resampled images, per perplexity of the model's runs."""
    runs = [model] + ([f"{model} (no retrieval)"] if model == "ra-cm3" else [])
    out: dict[str, Stat] = {}
    for run in runs:
        suffix = run.removeprefix(model)
        for name, (key, _) in PPL.items():
            pairs = np.array([r["nll"][run][key] if run in r["nll"] else (0.0, 0)
                              for r in part.images], np.float64).reshape(-1, 2)  # (n, 2)
            if pairs[:, 1].sum() > 0:
                out[name + suffix] = perplexity_of(pairs)
    return out


def perplexity_of(pairs: np.ndarray) -> Stat:
    """(n, 2) per-image (summed NLL, tokens) -> exp(sum NLL / sum tokens) over resampled rows."""
    def stat(idx: np.ndarray) -> float:
        n = pairs[idx, 1].sum()
        return math.exp(pairs[idx, 0].sum() / n) if n > 0 else math.nan
    return stat


def model_stats(part: ShardRecords, model: str) -> dict[str, Stat]:
    return image_stats(part, model) | caption_stats(part, model) | entity_stats(part, model) | (
        ppl_stats(part, model) if model != "retrieval-baseline" else {})


def counts_of(part: ShardRecords, model: str) -> dict[str, int]:
    gen = part.features.get(model)
    out = {"caption_to_image_n": int((~np.isnan(gen).any(axis=1)).sum()) if gen is not None else 0,
           "image_to_caption_n": sum(model in r["captions"] for r in part.images)}
    if model != "retrieval-baseline":
        out["perplexity_n"] = sum(model in r["nll"] for r in part.images)
    return out


def compute(part: ShardRecords, n_boot: int, seed: int) -> dict[str, Any]:
    """{"models": {model: {metric: value}}, "intervals": {model: {metric: [lo, hi]}},
    "differences": {"a - b": {metric: {value, lo, hi}}}}; intervals need n_boot > 0."""
    n = len(part.images)
    draws = resamples(n, n_boot, seed) if n_boot and n else np.zeros((0, n), np.int64)
    stats = {m: model_stats(part, m) for m in MODELS}
    models: dict[str, dict[str, Any]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    for m in MODELS:
        models[m], intervals[m] = dict(counts_of(part, m)), {}
        for name, stat in stats[m].items():
            iv = bootstrap(stat, draws)
            models[m][name] = round(iv.value, 4)
            if len(draws):
                intervals[m][name] = [round(iv.lo, 4), round(iv.hi, 4)]
    diffs: dict[str, dict[str, Any]] = {}
    for a, b in PAIRS:
        shared = [k for k in stats[a] if k in stats[b]]
        if len(draws) and shared:
            diffs[f"{a} - {b}"] = {k: difference(stats[a][k], stats[b][k], draws) for k in shared}
    return {"models": models, "intervals": intervals, "differences": diffs,
            "bootstrap": {"resamples": int(len(draws)), "level": 0.95, "unit": "test image",
                          "seed": seed}}


def difference(a: Stat, b: Stat, draws: np.ndarray) -> dict[str, Any]:
    iv: Interval = paired_difference(a, b, draws)
    return iv.as_dict() | {"separates": bool(iv.excludes_zero)}


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
