"""`racm3 ablate` and `racm3 seeds`: thin Prefect flows and CLI over pipelines/ablation (variants,
runs on any data root, the table) and the demo run once per seed (mean ± sd per metric)."""

from __future__ import annotations

import argparse
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
              overrides: list[str] | None = None, collect_only: bool = False) -> dict[str, Any]:
    """`racm3 demo` once per seed (its own data root, seed-<s>), then mean ± sd over seeds."""
    from flows.pipeline import demo_flow
    from pipelines.ablation.run import child_root, read_json
    from pipelines.ablation.seeds import over_seeds, seeds_markdown
    from storage.fs import DataRoot

    base = DataRoot(data_root)
    per_seed = {}
    for s in seeds:
        root = child_root(base, f"seed-{s}")
        if not collect_only:
            log.info("seeds: demo with seed %d in %s", s, root.uri)
            demo_flow(data_root=root.uri, seed=s, preset=preset, config_file=config_file,
                      overrides=overrides or [])
        path = root.artifact("evaluate", "main", "metrics.json")
        if root.exists(path):
            per_seed[s] = read_json(root, path)
    summary: dict[str, Any] = {"seeds": sorted(per_seed), "over_seeds": over_seeds(per_seed)}
    base.write_bytes_atomic(base.join("seeds.json"), json.dumps(summary, indent=2).encode())
    text = seeds_markdown(summary["over_seeds"], summary["seeds"]) + "\n"
    base.write_bytes_atomic(base.join("seeds.md"), text.encode())
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
    from pipelines.ablation.seeds import seeds_markdown

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    summary = seeds_run(args.data_root, seeds, args.preset, args.config_file, args.overrides,
                        args.collect_only)
    print(seeds_markdown(summary["over_seeds"], summary["seeds"]))
    return 0
