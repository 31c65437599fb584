"""`racm3 ablate` and `racm3 seeds`: thin Prefect flows and CLI over pipelines/ablation (variants,
runs on any data root, the table) and the demo run once per seed (mean ± sd per metric)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

log = logging.getLogger("racm3")


def ablate_flow_fn(data_root: str = "data", preset: str = "demo", config_file: str | None = None,
                   overrides: list[str] | None = None, only: str = "") -> list[dict[str, Any]]:
    from pipelines.ablation.run import ablate
    from pipelines.core.registry import load_config
    from storage.fs import DataRoot

    return ablate(DataRoot(data_root), load_config(preset, config_file, overrides or []), only)


def ablate_flow(**kwargs: Any) -> list[dict[str, Any]]:
    """The Prefect flow `racm3-ablate` (built on first use: importing this module stays cheap)."""
    from prefect import flow

    return flow(name="racm3-ablate")(ablate_flow_fn)(**kwargs)


def seeds_run(data_root: str, seeds: list[int], preset: str = "demo", config_file: str | None = None,
              overrides: list[str] | None = None, collect_only: bool = False,
              controls: bool = False, novel: bool = False) -> dict[str, Any]:
    """`racm3 demo` once per seed (its own data root, seed-<s>; what is done is skipped), with
    `controls` the oracle and random evaluations of its checkpoints (evaluate/oracle,
    evaluate/random), with `novel` the novel-entity experiment (memory in seed-<s>-novel); then
    mean ± sd over seeds (seeds.md, seeds.json) of what every seed root holds."""
    from flows.pipeline import demo_flow
    from pipelines.ablation.controls import CONTROLS, evaluate_control
    from pipelines.ablation.run import child_root
    from pipelines.core.registry import load_config
    from storage.fs import DataRoot

    base = DataRoot(data_root)
    cfgs = load_config(preset, config_file, overrides or [])
    for s in [] if collect_only else seeds:
        root = child_root(base, f"seed-{s}")
        log.info("seeds: demo with seed %d in %s", s, root.uri)
        demo_flow(data_root=root.uri, seed=s, preset=preset, config_file=config_file,
                  overrides=overrides or [])
        seeded = {**cfgs, "demo": dataclasses.replace(cfgs["demo"], seed=s)}
        for context in CONTROLS if controls else ():
            evaluate_control(root, seeded, context)
        if novel:
            from flows.novel_cli import run_novel

            run_novel(root, child_root(base, f"seed-{s}-novel"), seeded, NOVEL_ENTITIES, NOVEL_DOCS)
    return collect(base, seeds)


NOVEL_ENTITIES, NOVEL_DOCS = 40, 3  # `racm3 novel`'s defaults


def collect(base: Any, seeds: list[int]) -> dict[str, Any]:
    """seeds.json and seeds.md from the seed roots' evaluations: the main table, the controls
    (evaluate/oracle, evaluate/random), the novel entities (evaluate/novel) and the guidance rows
    (evaluate/guidance_w*, from `racm3 ablate`) where present."""
    from pipelines.ablation.controls import CONTROLS, controls_markdown
    from pipelines.ablation.guidance_table import evaluation_name, guidance_seeds_markdown
    from pipelines.ablation.novel_table import novel_seeds_markdown
    from pipelines.ablation.run import child_root, read_json
    from pipelines.ablation.seeds import over_seeds, seeds_markdown
    from pipelines.ablation.variants import VARIANTS

    guided = {evaluation_name(v): v.name for v in VARIANTS if v.table == "Guidance"}
    evaluations: dict[int, dict[str, dict[str, Any]]] = {}
    for s in seeds:
        root = child_root(base, f"seed-{s}")
        for name in ("main", *CONTROLS, "novel", *guided):
            path = root.artifact("evaluate", name, "metrics.json")
            if root.exists(path):
                evaluations.setdefault(s, {})[guided.get(name, name)] = read_json(root, path)
    main = {s: ev["main"] for s, ev in evaluations.items() if "main" in ev}
    novel = {s: ev["novel"] for s, ev in evaluations.items() if "novel" in ev}
    guidance = {s: {k: v for k, v in ev.items() if k in guided.values()} for s, ev in evaluations.items()}
    summary: dict[str, Any] = {"seeds": sorted(main), "over_seeds": over_seeds(main)}
    controls = {s: {("retrieved" if k == "main" else k): ev[k] for k in ("main", *CONTROLS) if k in ev}
                for s, ev in evaluations.items()}
    if any(c in ev for ev in controls.values() for c in CONTROLS):
        summary["controls"] = {c: over_seeds({s: ev[c] for s, ev in controls.items() if c in ev})
                               for c in ("retrieved", *CONTROLS)}
    if novel:
        summary["novel"] = {"seeds": sorted(novel), "over_seeds": over_seeds(novel)}
    base.write_bytes_atomic(base.join("seeds.json"), json.dumps(summary, indent=2).encode())
    parts = [seeds_markdown(summary["over_seeds"], summary["seeds"]), controls_markdown(controls),
             novel_seeds_markdown(novel), guidance_seeds_markdown(guidance)]
    summary["markdown"] = "\n\n".join(p for p in parts if p) + "\n"
    base.write_bytes_atomic(base.join("seeds.md"), summary["markdown"].encode())
    return summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flows.cli import config_args, data_root_arg

    p = sub.add_parser("seeds", help="the demo once per seed (data roots <data-root>/seed-<s>), "
                       "then mean ± sd over seeds of every metric (seeds.md, seeds.json)")
    data_root_arg(p)
    config_args(p)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated demo seeds")
    p.add_argument("--collect-only", action="store_true", help="only aggregate the seed roots")
    p.add_argument("--controls", action="store_true", help="also evaluate each seed's checkpoints "
                   "with oracle and with random documents in context (evaluate/oracle, "
                   "evaluate/random; evaluation only)")
    p.add_argument("--novel", action="store_true", help="also run the novel-entity experiment "
                   "per seed (`racm3 novel`: memory in <data-root>/seed-<s>-novel)")
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
    from pipelines.ablation.table import markdown
    from pipelines.ablation.variants import listing, select

    if args.list:
        print("\n".join(listing()))
        return 0
    select(args.only)  # an unknown variant exits 2 before any flow starts
    table = ablate_flow(data_root=args.data_root, preset=args.preset,
                        config_file=args.config_file, overrides=args.overrides, only=args.only)
    print(markdown(table))
    return 0


def cmd_seeds(args: argparse.Namespace) -> int:
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    summary = seeds_run(args.data_root, seeds, args.preset, args.config_file, args.overrides,
                        args.collect_only, args.controls, args.novel)
    print(summary["markdown"])
    return 0
