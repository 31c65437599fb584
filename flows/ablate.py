"""`racm3 ablate` and `racm3 seeds`: the paper's design analysis at demo scale, and the demo over
several seeds with mean ± sd per metric (Prefect flows; neither is part of `racm3 demo`).

Table 5 (relevance: retrieved vs random documents at train and at inference; modality: text-only
or image-only documents in context; diversity: top-K without the redundancy skip, no query
dropout; the retrieved documents' loss weight alpha in {0, 0.1, 0.3, 1.0}), Table 6 (K = 1, 2, 4, 8
at inference), Fig 9 (two model sizes, RA-CM3 vs vanilla) and, beyond the paper, both models
trained without the block-diagonal mask between packed examples. Every trained variant writes its own
checkpoint (`train.name` = the variant: train/<name>.pt) and its own evaluation (`evaluate.name`);
variants that change the retrieved neighbours run in their own copy of the data root. The data
root must hold the demo pipeline through `train` (ra-cm3 and vanilla: the "final" rows).

Writes ablate/table.md, ablate/table.json and ablate/ablate.report.html: our image and text
perplexities beside the paper's, and whether the direction against the final row agrees.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("racm3")

FINAL = "ra-cm3"  # the demo's RA-CM3 (train/ra-cm3.pt): Table 5's "final" row
PPL = ("image ppl", "text ppl")


@dataclass(frozen=True)
class Variant:
    """One ablation row: what it trains (None = evaluates an existing checkpoint), how it is
    evaluated, the paper's (image ppl, text ppl) and the row its direction is judged against."""

    name: str
    table: str
    label: str
    paper: tuple[float, float] | None
    train: dict[str, Any] | None = None  # train section fields (name = the variant)
    ra: str = FINAL  # checkpoint evaluated as RA-CM3 when train is None
    vanilla: str = "vanilla"
    evaluate: dict[str, Any] = field(default_factory=dict)
    retrieve: dict[str, Any] | None = None  # new neighbours: the variant runs in a copied root
    against: str = FINAL  # the row the direction is judged against
    model: str = "ra-cm3"  # whose perplexities the row reports
    same_as: str = ""  # reuse this variant's evaluation (same checkpoints and settings)


VARIANTS: tuple[Variant, ...] = (
    Variant(FINAL, "Table 5", "Retrieve at train & infer (final)", (227, 13)),
    Variant("rand-train-rand-infer", "Table 5", "Random at train & infer", (246, 23),
            train={"random_neighbours": True}, evaluate={"random_context": True}),
    Variant("retr-train-rand-infer", "Table 5", "Retrieve at train, random at infer", (246, 24),
            evaluate={"random_context": True}),
    Variant("rand-train-retr-infer", "Table 5", "Random at train, retrieve at infer", (243, 18),
            ra="rand-train-rand-infer"),  # the same training as the row above: reuse its checkpoint
    Variant("text-only-docs", "Table 5", "Only text in context (inference)", (234, 15),
            evaluate={"context_modality": "text"}),
    Variant("image-only-docs", "Table 5", "Only image in context (inference)", (234, 15),
            evaluate={"context_modality": "image"}),
    Variant("top-k", "Table 5", "Simply take top K (no redundancy skip, no query dropout)", (244, 17),
            train={}, retrieve={"redundancy_threshold": 1.01, "query_sim_threshold": 1.01,
                                "variants": 0}),
    Variant("no-query-dropout", "Table 5", "Avoid redundancy, no query dropout", (235, 15),
            train={}, retrieve={"variants": 0}),
    Variant("alpha-0", "Table 5", "alpha = 0", (239, 17), train={"alpha": 0.0}),
    Variant("alpha-0.3", "Table 5", "alpha = 0.3", (231, 14), train={"alpha": 0.3}),
    Variant("alpha-1", "Table 5", "alpha = 1", (240, 17), train={"alpha": 1.0}),
    *(Variant(f"k-{k}", "Table 6", f"K = {k} at inference", (p, math.nan), evaluate={"k": k},
              against="k-2") for k, p in ((1, 228), (2, 227), (4, 228), (8, 232))),
    Variant("small-ra", "Fig 9", "small model, RA-CM3", None,
            train={"n_layer": 2, "d_model": 64, "n_head": 2}, against="small-vanilla"),
    Variant("small-vanilla", "Fig 9", "small model, vanilla CM3", None,
            train={"variant": "vanilla", "n_layer": 2, "d_model": 64, "n_head": 2},
            model="vanilla", against="small-ra"),
    Variant("base-vanilla", "Fig 9", "demo model, vanilla CM3", None, model="vanilla",
            against=FINAL, same_as=FINAL),
    # Not in the paper (it trains one example per sequence): packed examples that can see each
    # other, the way racm3 trained before train.block_mask.
    Variant("no-mask-ra", "Packing", "RA-CM3, packed examples see each other (no block mask)",
            None, train={"block_mask": False}),
    Variant("no-mask-vanilla", "Packing", "vanilla CM3, no block mask", None,
            train={"variant": "vanilla", "block_mask": False}, model="vanilla",
            against="base-vanilla"),
)


def select(only: str) -> list[Variant]:
    if not only:
        return list(VARIANTS)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {v.name for v in VARIANTS}
    if unknown:
        raise ValueError(f"--only: unknown variants {sorted(unknown)}; see `racm3 ablate --list`")
    trained = {v.name for v in VARIANTS if v.train is not None}
    names |= {v.ra for v in VARIANTS if v.name in names and v.ra in trained}  # checkpoints it reads
    return [v for v in VARIANTS if v.name in names or v.name == FINAL]


# ---------------------------------------------------------------------------- running


def variant_root(base: Any, v: Variant) -> Any:
    """The base data root, or (new neighbours) a copy of it under ablate/roots/<name>."""
    from storage.fs import DataRoot

    if v.retrieve is None:
        return base
    dst = base.join("ablate", "roots", v.name)
    if not os.path.exists(dst):
        shutil.copytree(base.join(), dst, ignore=shutil.ignore_patterns("ablate", "evaluate",
                                                                        "evaluate-part"))
    return DataRoot(dst)


def run_variant(base: Any, cfgs: dict[str, Any], v: Variant) -> dict[str, Any]:
    """Train (when it does), evaluate; the evaluation's metrics."""
    from pipelines.core.runner import run_stage

    root = variant_root(base, v)
    c = dict(cfgs)
    if v.retrieve is not None:
        c["retrieve"] = dataclasses.replace(cfgs["retrieve"], **v.retrieve)
        for stage in ("retrieve", "pack"):
            check(run_stage(stage, root, c), stage, v)
    ra, vanilla = v.ra, v.vanilla
    if v.train is not None:
        fields = {"variant": "ra-cm3"} | v.train | {"name": v.name}
        c["train"] = dataclasses.replace(cfgs["train"], **fields)
        check(run_stage("train", root, c), "train", v)
        if fields["variant"] == "vanilla":
            vanilla = v.name
        else:
            ra = v.name
    c["evaluate"] = dataclasses.replace(cfgs["evaluate"], **({"generate": False} | v.evaluate),
                                        name=v.name.replace("-", "_"), ra_checkpoint=ra,
                                        vanilla_checkpoint=vanilla)
    for stage in ("evaluate-part", "evaluate"):
        check(run_stage(stage, root, c), stage, v)
    with open(root.artifact("evaluate", c["evaluate"].name, "metrics.json")) as f:
        return json.load(f)


def check(report: Any, stage: str, v: Variant) -> None:
    if report.failed:
        raise RuntimeError(f"ablate {v.name}: {stage} failed: {report.failed}")


def ours(metrics: dict[str, Any], v: Variant) -> tuple[float, float]:
    m = metrics["models"][v.model]
    return tuple(float(m.get(k, math.nan)) for k in PPL)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- the table


def direction(a: float, b: float) -> int:
    """Sign of a - b, 0 when either is missing or they are equal."""
    if not (math.isfinite(a) and math.isfinite(b)) or a == b:
        return 0
    return 1 if a > b else -1


def rows(variants: list[Variant], results: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """Each row beside the paper's, with whether its direction against `against` agrees."""
    by = {v.name: v for v in variants}
    out = []
    for v in variants:
        mine = results.get(v.name, (math.nan, math.nan))
        ref = by.get(v.against)
        row: dict[str, Any] = {"table": v.table, "variant": v.name, "label": v.label,
                               "ours_image_ppl": mine[0], "ours_text_ppl": mine[1],
                               "paper_image_ppl": v.paper[0] if v.paper else None,
                               "paper_text_ppl": v.paper[1] if v.paper else None,
                               "against": v.against if ref and ref is not v else None}
        if ref is not None and ref is not v:
            theirs = results.get(ref.name, (math.nan, math.nan))
            for i, k in enumerate(("image", "text")):
                our_dir = direction(mine[i], theirs[i])
                if v.paper and ref.paper:  # the paper's sign of (row - reference)
                    paper_dir = direction(v.paper[i], ref.paper[i])
                elif v.table == "Fig 9":  # RA-CM3 below vanilla at every size
                    paper_dir = -1 if v.model == "ra-cm3" else 1
                else:
                    paper_dir = 0
                row[f"{k}_agrees"] = None if 0 in (our_dir, paper_dir) else our_dir == paper_dir
        out.append(row)
    return out


def fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


HEADER = ["table", "variant", "ours image ppl", "paper image ppl", "image agrees",
          "ours text ppl", "paper text ppl", "text agrees", "vs"]


def cells(r: dict[str, Any]) -> list[str]:
    return [r["table"], r["label"], fmt(r["ours_image_ppl"]), fmt(r["paper_image_ppl"]),
            fmt(r.get("image_agrees")), fmt(r["ours_text_ppl"]), fmt(r["paper_text_ppl"]),
            fmt(r.get("text_agrees")), r["against"] or ""]


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in table]
    agree = [r[k] for r in table for k in ("image_agrees", "text_agrees") if r.get(k) is not None]
    lines += ["", f"Directions that agree with the paper: {sum(agree)} of {len(agree)} "
              f"(each row against the `vs` row; Fig 9: RA-CM3 below vanilla at each size)."]
    return "\n".join(lines)


def svg_bars(table: list[dict[str, Any]], key: str, width: int = 760) -> str:
    """Horizontal bars of ours (red) and the paper's (grey), each relative to its `vs` row."""
    items = []
    by = {r["variant"]: r for r in table}
    for r in table:
        ref = by.get(r["against"] or "")
        if ref is None:
            continue
        ours_rel = rel(r[f"ours_{key}"], ref[f"ours_{key}"])
        paper_rel = rel(r[f"paper_{key}"], ref[f"paper_{key}"])
        items.append((r["label"], ours_rel, paper_rel))
    h, pad, mid = 18 * 2 * len(items) + 40, 300, 300 + (width - 300) / 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}">',
             f'<text x="{mid}" y="14" text-anchor="middle" font-size="12">{key}: row / its vs '
             f'row - 1 (red ours, grey paper; right = worse)</text>',
             f'<line x1="{mid}" y1="20" x2="{mid}" y2="{h}" stroke="#444"/>']
    scale = (width - pad) / 2 / max([abs(x) for _, a, b in items for x in (a, b)
                                     if math.isfinite(x)] + [0.05])
    for i, (label, a, b) in enumerate(items):
        y = 24 + 36 * i
        parts.append(f'<text x="{pad - 6}" y="{y + 14}" text-anchor="end" font-size="10">'
                     f'{html.escape(label[:48])}</text>')
        for j, (val, colour) in enumerate(((a, "#d62728"), (b, "#999"))):
            if math.isfinite(val):
                x0, x1 = sorted((mid, mid + val * scale))
                parts.append(f'<rect x="{x0:.1f}" y="{y + 16 * j}" width="{max(x1 - x0, 1):.1f}" '
                             f'height="14" fill="{colour}"/>')
    return "".join(parts) + "</svg>"


def rel(a: Any, b: Any) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b - 1


def html_page(table: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(r)) + "</tr>"
                   for r in table)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:"
             "collapse}td,th{border:1px solid #bbb;padding:3px 8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>racm3 ablations</title>"
            f"<style>{style}</style></head><body><h1>RA-CM3 ablations at demo scale</h1>"
            f"<table><tr>{head}</tr>{body}</table>"
            f"<h2>Directions</h2>{svg_bars(table, 'image_ppl')}{svg_bars(table, 'text_ppl')}"
            f"<p>{html.escape(markdown(table).splitlines()[-1])}</p></body></html>")


def write(base: Any, table: list[dict[str, Any]]) -> str:
    out = base.join("ablate")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown(table) + "\n")
    path = os.path.join(out, "ablate.report.html")
    with open(path, "w") as f:
        f.write(html_page(table))
    return path


# ---------------------------------------------------------------------------- flow and CLI


def ablate(data_root: str, cfgs: dict[str, Any], only: str = "") -> list[dict[str, Any]]:
    """Every selected variant in order (the final row first), then the table and report."""
    from storage.fs import DataRoot

    base = DataRoot(data_root)
    variants = select(only)
    results: dict[str, tuple[float, float]] = {}
    evaluations: dict[str, dict[str, Any]] = {}
    for v in variants:
        log.info("ablate: %s (%s)", v.name, v.label)
        if v.same_as not in evaluations:
            evaluations[v.name] = run_variant(base, cfgs, v)
        results[v.name] = ours(evaluations[v.same_as or v.name], v)
    table = rows(variants, results)
    log.info("ablate: report %s", write(base, table))
    return table


def ablate_flow_fn(data_root: str = "data", preset: str = "demo", config_file: str | None = None,
                   overrides: list[str] | None = None, only: str = "") -> list[dict[str, Any]]:
    from pipelines.core.registry import load_config

    return ablate(data_root, load_config(preset, config_file, overrides or []), only)


def ablate_flow(**kwargs: Any) -> list[dict[str, Any]]:
    """The Prefect flow `racm3-ablate` (built on first use: importing this module stays cheap)."""
    from prefect import flow

    return flow(name="racm3-ablate")(ablate_flow_fn)(**kwargs)


# ---------------------------------------------------------------------------- seeds


def seed_roots(data_root: str, seeds: list[int]) -> dict[int, str]:
    return {s: os.path.join(data_root, f"seed-{s}") for s in seeds}


def over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """mean, sd (n-1) and n over seeds of every model metric and paired difference."""
    import numpy as np

    values: dict[tuple[str, str], list[float]] = {}
    separated: dict[tuple[str, str], list[int]] = {}  # per paired difference: its sign where the interval excludes 0
    for m in per_seed.values():
        for model, d in m["models"].items():
            for k, v in d.items():
                if not k.endswith("_n"):
                    values.setdefault((model, k), []).append(float(v))
        for pair, d in (m.get("differences") or {}).items():
            for k, v in d.items():
                values.setdefault((pair, k), []).append(float(v["value"]))
                sep = separated.setdefault((pair, k), [])
                if v.get("separates"):
                    sep.append(1 if v["value"] > 0 else -1)
    out: dict[str, Any] = {}
    for (group, k), vs in values.items():
        arr = np.asarray(vs)
        out.setdefault(group, {})[k] = {"mean": round(float(arr.mean()), 4), "n": len(vs),
                                        "sd": round(float(arr.std(ddof=1)), 4) if len(vs) > 1 else None}
        if (group, k) in separated:  # how many seeds' paired intervals exclude 0, by sign
            signs = separated[(group, k)]
            out[group][k] |= {"above_0": signs.count(1), "below_0": signs.count(-1)}
    return out


def seeds_markdown(summary: dict[str, Any], seeds: list[int]) -> str:
    groups = list(summary)
    names: list[str] = []
    for g in groups:
        names += [k for k in summary[g] if k not in names]
    lines = [f"Mean ± sd over seeds {', '.join(map(str, seeds))} (test split). For a paired "
             f"difference, (a↓ b↑ of n): seeds whose 95% bootstrap interval lies wholly below / "
             f"above 0.", "",
             "| metric | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for n in names:
        cells = []
        for g in groups:
            c = summary[g].get(n)
            cells.append("—" if c is None else f"{c['mean']:.4g}" + (f" ± {c['sd']:.2g}" if c["sd"] is not None else "")
                         + (f" ({c['below_0']}↓ {c['above_0']}↑ of {c['n']})" if "above_0" in c else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_run(data_root: str, seeds: list[int], preset: str = "demo", config_file: str | None = None,
              overrides: list[str] | None = None, collect_only: bool = False) -> dict[str, Any]:
    """`racm3 demo` once per seed (its own data root, seed-<s>), then mean ± sd over seeds."""
    from flows.pipeline import demo_flow

    roots = seed_roots(data_root, seeds)
    per_seed = {}
    for s, root in roots.items():
        if not collect_only:
            log.info("seeds: demo with seed %d in %s", s, root)
            demo_flow(data_root=root, seed=s, preset=preset, config_file=config_file,
                      overrides=overrides or [])
        path = os.path.join(root, "evaluate", "main.metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                per_seed[s] = json.load(f)
    summary: dict[str, Any] = {"seeds": sorted(per_seed), "over_seeds": over_seeds(per_seed)}
    os.makedirs(data_root, exist_ok=True)
    with open(os.path.join(data_root, "seeds.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(data_root, "seeds.md"), "w") as f:
        f.write(seeds_markdown(summary["over_seeds"], summary["seeds"]) + "\n")
    return summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flows.cli import config_args, data_root_arg

    p = sub.add_parser("seeds", help="the demo once per seed (data roots <data-root>/seed-<s>), "
                       "then mean ± sd over seeds of every metric (seeds.md, seeds.json)")
    data_root_arg(p)
    config_args(p)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated demo seeds")
    p.add_argument("--collect-only", action="store_true", help="only aggregate the seed roots")
    p.set_defaults(run=cmd_seeds)

    p = sub.add_parser("ablate", help="Table 5, Table 6 and Fig 9 at demo scale (each variant "
                       "trains its own checkpoint); ablate/ablate.report.html")
    data_root_arg(p)
    config_args(p)
    p.add_argument("--only", default="", help="comma-separated variant names (the final row "
                   "always runs)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.set_defaults(run=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:<24} {v.table:<8} {v.label}")
        return 0
    table = ablate_flow(data_root=args.data_root, preset=args.preset,
                        config_file=args.config_file, overrides=args.overrides, only=args.only)
    print(markdown(table))
    return 0


def cmd_seeds(args: argparse.Namespace) -> int:
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    summary = seeds_run(args.data_root, seeds, args.preset, args.config_file, args.overrides,
                        args.collect_only)
    print(seeds_markdown(summary["over_seeds"], summary["seeds"]))
    return 0
