"""The novel-entity table (issue 19): RA-CM3 with the novel memory vs vanilla vs the retrieval
baseline on entities no training document shows, from `racm3 novel`'s evaluate/novel metrics
(one seed, with intervals) or over seeds (mean ± sd, paired intervals' signs)."""

from __future__ import annotations

from typing import Any

from pipelines.ablation.seeds import fmt_cell, metric_key, over_seeds
from pipelines.evaluation.metrics import CAPTION_ENTITY
from pipelines.evaluation.report import cell, difference_cell, md_table

METRICS = (("image ppl", "image ppl ↓"), ("KID", "KID ↓"), ("FID", "FID-type ↓"),
           ("CLIP-score", "CLIP score ↑"), ("CIDEr-D", "CIDEr-D ↑"),
           (CAPTION_ENTITY, "caption same-entity % ↑"))
MODELS = ("ra-cm3", "vanilla", "retrieval-baseline")
PAIRS = ("ra-cm3 - vanilla", "ra-cm3 - retrieval-baseline")
HEADER = ["metric", "RA-CM3 (novel memory)", "vanilla CM3", "retrieval baseline (novel memory)",
          "RA − vanilla [95%]", "RA − baseline [95%]"]
NOTE = ("Novel entities: no training document shows them; RA-CM3 and the retrieval baseline "
        "retrieve from a second memory built with the trained CLIP, VQGAN and BPE (`racm3 novel`).")


def novel_markdown(metrics: dict[str, Any]) -> str:
    """One evaluation's table: `value [95% interval]` per model, paired differences (* = the
    interval excludes 0)."""
    ra = metrics["models"]["ra-cm3"]
    rows = []
    for column, label in METRICS:
        key = metric_key(ra, column) or metric_key(metrics["models"]["retrieval-baseline"], column)
        rows.append([label] + [cell(metrics, m, key) if key else "—" for m in MODELS]
                    + [difference_cell(metrics, p, key) for p in PAIRS])
    n = metrics.get("settings", {}).get("images", "?")
    return "\n".join(["# Novel entities", "", f"{NOTE} Test images: {n}; [95% bootstrap "
                      "interval over test images]; * = the paired interval excludes 0.", "",
                      md_table(HEADER, rows)])


def novel_seeds_markdown(per_seed: dict[int, dict[str, Any]]) -> str:
    """Mean ± sd over seeds; for the differences, (a↓ b↑ of n): seeds whose 95% interval lies
    wholly below / above 0. "" when no seed has a novel evaluation."""
    if not per_seed:
        return ""
    summary = over_seeds(per_seed)
    rows = []
    for column, label in METRICS:
        row = [label]
        for group in (*MODELS, *PAIRS):
            have = summary.get(group, {})
            key = metric_key(have, column)
            c = have.get(key) if key else None
            row.append(fmt_cell(c))
        rows.append(row)
    seeds = ", ".join(str(s) for s in sorted(per_seed))
    return "\n".join([f"## Novel entities (seeds {seeds})", "", f"{NOTE} Mean ± sd over seeds; "
                      "(a↓ b↑ of n): seeds whose paired 95% interval lies wholly below / above 0.",
                      "", md_table(HEADER, rows)])
