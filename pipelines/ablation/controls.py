"""Controls per seed (issue 19): the seed's own checkpoints evaluated with oracle and with random
memory documents in context (evaluation only; named outputs evaluate/oracle and evaluate/random,
so a rerun skips what is done), shown over seeds as rows beside the retrieved one."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pipelines.ablation.run import read_json
from pipelines.ablation.seeds import mean_sd, metric_key
from pipelines.core.runner import run_stage
from pipelines.evaluation.metrics import CAPTION_ENTITY
from pipelines.evaluation.report import md_table
from storage.fs import DataRoot

log = logging.getLogger("racm3")

CONTROLS = ("oracle", "random")  # evaluate.context values, and their evaluate.name
ROWS = (("ra-cm3", "retrieved", "RA-CM3, retrieved context"),
        ("ra-cm3", "oracle", "RA-CM3, oracle context (same entity)"),
        ("ra-cm3", "random", "RA-CM3, random context"),
        ("vanilla", "retrieved", "vanilla CM3 (no context)"),
        ("retrieval-baseline", "retrieved", "retrieval baseline, retrieved"),
        ("retrieval-baseline", "oracle", "retrieval baseline, oracle"))
COLUMNS = (("image ppl", "image ppl ↓"), ("CLIP-score", "CLIP score ↑"), ("FID", "FID-type ↓"),
           ("KID", "KID ↓"), ("CIDEr-D", "CIDEr-D ↑"), (CAPTION_ENTITY, "caption same-entity % ↑"),
           ("context", "context same-entity % (rank 1)"))


def evaluate_control(root: DataRoot, cfgs: dict[str, Any], context: str) -> tuple[dict[str, Any], int]:
    """evaluate-part + evaluate of the root's checkpoints with `context` documents, as
    evaluate/<context>: (its metrics, how many shards ran; 0 when all were up to date)."""
    c = {**cfgs, "evaluate": dataclasses.replace(cfgs["evaluate"], context=context, name=context)}
    ran = 0
    for stage in ("evaluate-part", "evaluate"):
        report = run_stage(stage, root, c)
        if report.failed:
            raise RuntimeError(f"control {context}: {stage} failed in {root.uri}: {report.failed}")
        ran += len(report.ran)
    log.info("controls: %s in %s (%d shards ran)", context, root.uri, ran)
    return read_json(root, root.artifact("evaluate", context, "metrics.json")), ran


def row_value(metrics: dict[str, Any], model: str, column: str) -> float | None:
    """One cell's number in one seed's evaluation: the model's metric, or (column "context") the
    rate at which the caption query's rank-1 context document names the image's entity."""
    if column == "context":
        if model == "vanilla":
            return None  # no documents in context
        rate = (metrics.get("context_same_entity") or {}).get("caption_query")
        return None if rate is None else float(rate["rank1"])
    have = metrics["models"].get(model, {})
    key = metric_key(have, column)
    return None if key is None else float(have[key])


def controls_markdown(per_seed: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Rows retrieved / oracle / random (and vanilla, the baseline) x the issue's metrics, mean ±
    sd over the seeds that have each evaluation; "" when no seed has a control."""
    if not any(ctx in ev for ev in per_seed.values() for ctx in CONTROLS):
        return ""
    rows = []
    for model, ctx, label in ROWS:
        cells = []
        for column, _ in COLUMNS:
            vals = [v for ev in per_seed.values() if ctx in ev
                    for v in [row_value(ev[ctx], model, column)] if v is not None]
            cells.append(mean_sd(vals))
        rows.append([label, *cells])
    seeds = ", ".join(str(s) for s in sorted(per_seed))
    return "\n".join([
        "## Controls: documents in context at inference", "",
        f"Seeds {seeds}; the seed's own checkpoints, evaluation only (`evaluate.context`: oracle = "
        "memory documents naming the test image's entity, never its own; random = random memory "
        "documents). Mean ± sd over seeds (n < 3 shown as (n=...)). Context same-entity %: the "
        "caption query's rank-1 document in context names the image's entity.", "",
        md_table(["row", *(h for _, h in COLUMNS)], rows)])
