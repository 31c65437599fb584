"""The guidance rows' own table: CLIP score and FID-type (with KID) of caption -> image per
guidance weight, both models trained with caption dropout (the README's guidance table)."""

from __future__ import annotations

from typing import Any

from pipelines.ablation.variants import Variant
from pipelines.evaluation.report import cell, difference_cell, md_table

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
        rows.append([f"{v.evaluate['guidance']:g}"] + [cell(m, model, n) for n in names
                                                       for model, _ in MODELS]
                    + [difference_cell(m, "ra-cm3 - vanilla", "CLIP-score", star=False)])
    return "\n".join([
        "## Guidance as trained for", "",
        "Both models trained with `train.caption_dropout = 0.1` (checkpoints `guidance-w0`, "
        "`guidance-w0-vanilla`), caption -> image sampled with `evaluate.guidance = w` (0 = off); "
        "test split, [95% bootstrap interval over test images].", "", md_table(header, rows)])


def evaluation_name(v: Variant) -> str:
    """The evaluate output a variant writes (`evaluate/<name>`): run.py's naming."""
    return v.name.replace("-", "_")


def guidance_seeds_markdown(per_seed: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Over seeds (each seed root's `racm3 ablate --only guidance-w1,guidance-w3`): per weight,
    each model's CLIP score, FID-type and KID as mean ± sd, and RA - vanilla on the CLIP score with
    the seeds whose paired interval excludes 0; "" when no seed has a guidance evaluation."""
    from pipelines.ablation.seeds import fmt_cell, metric_key, over_seeds
    from pipelines.ablation.variants import VARIANTS

    rows, seeds = [], set()
    for v in (v for v in VARIANTS if v.table == "Guidance"):
        have = {s: ev[v.name] for s, ev in per_seed.items() if v.name in ev}
        if not have:
            continue
        seeds |= set(have)
        summary = over_seeds(have)
        cells = [fmt_cell(summary.get(m, {}).get(metric_key(summary.get(m, {}), col) or ""))
                 for col in ("CLIP-score", "FID", "KID") for m, _ in MODELS]
        diff = summary.get("ra-cm3 - vanilla", {}).get("CLIP-score")
        rows.append([f"{v.evaluate['guidance']:g}", *cells, fmt_cell(diff)])
    if not rows:
        return ""
    header = ["guidance w"] + [f"{label} {col}" for col in ("CLIP score ↑", "FID-type ↓", "KID ↓")
                               for _, label in MODELS] + ["RA − vanilla CLIP score"]
    return "\n".join([
        f"## Guidance as trained for (seeds {', '.join(map(str, sorted(seeds)))})", "",
        "Both models trained with `train.caption_dropout = 0.1`, caption -> image sampled with "
        "`evaluate.guidance = w`; mean ± sd over seeds, (a↓ b↑ of n): seeds whose paired 95% "
        "interval lies wholly below / above 0.", "", md_table(header, rows)])
