"""The guidance rows' own table: CLIP score and FID-type (with KID) of caption -> image per
guidance weight, both models trained with caption dropout (the README's guidance table)."""

from __future__ import annotations

from typing import Any

from pipelines.ablation.variants import Variant
from pipelines.evaluation.report import cell, md_table

MODELS = (("ra-cm3", "RA-CM3"), ("vanilla", "vanilla"))


def image_metrics(metrics: dict[str, Any]) -> list[str]:
    """The CLIP score, then the judge's FID-type and KID names, as this evaluation spells them."""
    have = metrics["models"]["ra-cm3"]
    return ["CLIP-score"] + [k for k in have if k.startswith(("FID", "KID"))]


def guidance_markdown(variants: list[Variant], evaluations: dict[str, dict[str, Any]]) -> str:
    """One row per guidance weight: each model's metric `value [95% interval]` and RA - vanilla
    on the CLIP score; "" when no guidance row was evaluated."""
    done = [v for v in variants if v.table == "Guidance" and v.name in evaluations]
    if not done:
        return ""
    names = image_metrics(evaluations[done[0].name])
    header = ["guidance w"] + [f"{label} {n}" for n in names for _, label in MODELS]
    header.append("RA − vanilla CLIP-score [95%]")
    rows = []
    for v in done:
        m = evaluations[v.name]
        diff = (m.get("differences") or {}).get("ra-cm3 - vanilla", {}).get("CLIP-score")
        rows.append([f"{v.evaluate['guidance']:g}"] + [cell(m, model, n) for n in names
                                                       for model, _ in MODELS]
                    + [f"{diff['value']:.4g} [{diff['lo']:.4g}, {diff['hi']:.4g}]" if diff else "—"])
    return "\n".join([
        "## Guidance as trained for", "",
        "Both models trained with `train.caption_dropout = 0.1` (checkpoints `guidance-w0`, "
        "`guidance-w0-vanilla`), caption -> image sampled with `evaluate.guidance = w` (0 = off); "
        "test split, [95% bootstrap interval over test images].", "", md_table(header, rows)])
