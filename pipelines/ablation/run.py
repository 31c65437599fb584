"""Run ablation variants on a data root (local or object store), all IO through `DataRoot`.

Every trained variant writes its own checkpoint (`train.name` = the variant: train/<name>.pt) and
its own evaluation (`evaluate.name`); a variant that changes the retrieved neighbours runs in its
own copy of the data root (ablate/roots/<name>). The root must hold the demo pipeline through
`train` (ra-cm3 and vanilla: the "final" rows). Writes ablate/table.md, ablate/table.json and
ablate/ablate.report.html.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import posixpath
from typing import Any

from pipelines.ablation.guidance_table import evaluation_name, guidance_markdown
from pipelines.ablation.table import html_page, markdown, rows
from pipelines.ablation.variants import Variant, select
from pipelines.core.report import StageReport
from pipelines.core.runner import run_stage
from storage.fs import DataRoot

log = logging.getLogger("racm3")
NOT_COPIED = frozenset({"ablate", "evaluate", "evaluate-part"})  # each variant makes its own


def child_root(base: DataRoot, *parts: str) -> DataRoot:
    """A data root inside `base` (same filesystem: a folder, or a key prefix)."""
    return DataRoot(base.url(base.join(*parts)), owner=base.owner)


def copy_root(base: DataRoot, dst: DataRoot, skip: frozenset[str] = NOT_COPIED) -> int:
    """Copy every file of `base` but the top-level folders in `skip` to `dst` (any filesystem);
    the number copied.

    A marker written last makes the copy all-or-nothing: an interrupted copy is redone.
    """
    marker = dst.join(".copied")
    if dst.exists(marker):
        return 0
    src = [p for p in base.fs.find(base.path) if base.rel(p).split("/", 1)[0] not in skip]
    dsts = [dst.join(base.rel(p)) for p in src]
    for d in sorted({posixpath.dirname(p) for p in dsts}):
        dst.makedirs(d)
    if type(base.fs) is type(dst.fs):
        if src:
            base.fs.copy(src, dsts)  # server-side on object stores
    else:  # across filesystems (a local root to s3://)
        for s, d in zip(src, dsts, strict=True):
            dst.fs.pipe_file(d, base.fs.cat_file(s))
    dst.write_bytes_atomic(marker, str(len(src)).encode())
    return len(src)


def variant_root(base: DataRoot, v: Variant) -> DataRoot:
    """The base data root, or (new neighbours) a copy of it under ablate/roots/<name>."""
    if v.retrieve is None:
        return base
    root = child_root(base, "ablate", "roots", v.name)
    copy_root(base, root)
    return root


def read_json(root: DataRoot, path: str) -> Any:
    with root.fs.open(path, "r") as f:
        return json.load(f)


def run_variant(base: DataRoot, cfgs: dict[str, Any], v: Variant) -> dict[str, Any]:
    """Train (when it does), evaluate; the evaluation's metrics."""
    root = variant_root(base, v)
    c = dict(cfgs)
    if v.retrieve is not None:
        c["retrieve"] = dataclasses.replace(cfgs["retrieve"], **v.retrieve)
        for stage in ("retrieve", "pack"):
            check(run_stage(stage, root, c), stage, v)
    ra, vanilla = v.ra, v.vanilla
    if v.train is not None:
        fields = {"variant": "ra-cm3"} | v.train | {"name": v.name}
        train(root, c, v, fields)
        if fields["variant"] == "vanilla":
            vanilla = v.name
        else:
            ra = v.name
    if v.train_vanilla is not None:
        vanilla = v.vanilla_name
        train(root, c, v, v.train_vanilla | {"variant": "vanilla", "name": vanilla})
    c["evaluate"] = dataclasses.replace(cfgs["evaluate"], **({"generate": False} | v.evaluate),
                                        name=evaluation_name(v), ra_checkpoint=ra,
                                        vanilla_checkpoint=vanilla)
    for stage in ("evaluate-part", "evaluate"):
        check(run_stage(stage, root, c), stage, v)
    return read_json(root, root.artifact("evaluate", c["evaluate"].name, "metrics.json"))


def train(root: DataRoot, c: dict[str, Any], v: Variant, fields: dict[str, Any]) -> None:
    """Train one checkpoint of the variant (skipped when train/<name>.pt is up to date)."""
    base = c["train"]
    c["train"] = dataclasses.replace(base, **fields)
    check(run_stage("train", root, c), "train", v)
    c["train"] = base


def check(report: StageReport, stage: str, v: Variant) -> None:
    if report.failed:
        raise RuntimeError(f"ablate {v.name}: {stage} failed: {report.failed}")


def ours(metrics: dict[str, Any], v: Variant) -> tuple[float, float]:
    m = metrics["models"][v.model]
    return (float(m.get("image ppl", math.nan)), float(m.get("text ppl", math.nan)))


def write(base: DataRoot, table: list[dict[str, Any]], guidance: str = "") -> str:
    """table.json, table.md (and guidance.md, the guidance rows' table, appended to it) and
    ablate.report.html under ablate/; the page's URL."""
    out = base.join("ablate")
    base.write_bytes_atomic(posixpath.join(out, "table.json"), json.dumps(table, indent=2).encode())
    text = markdown(table) + ("\n\n" + guidance if guidance else "")
    base.write_bytes_atomic(posixpath.join(out, "table.md"), (text + "\n").encode())
    if guidance:
        base.write_bytes_atomic(posixpath.join(out, "guidance.md"), (guidance + "\n").encode())
    page = posixpath.join(out, "ablate.report.html")
    base.write_bytes_atomic(page, html_page(table).encode())
    return base.url(page)


def ablate(base: DataRoot, cfgs: dict[str, Any], only: str = "") -> list[dict[str, Any]]:
    """Every selected variant in order (the final row first), then the table and report."""
    variants = select(only)
    results: dict[str, tuple[float, float]] = {}
    evaluations: dict[str, dict[str, Any]] = {}
    for v in variants:
        log.info("ablate: %s (%s)", v.name, v.label)
        if v.same_as not in evaluations:
            evaluations[v.name] = run_variant(base, cfgs, v)
        results[v.name] = ours(evaluations[v.same_as or v.name], v)
    table = rows(variants, results)
    log.info("ablate: report %s", write(base, table, guidance_markdown(variants, evaluations)))
    return table
