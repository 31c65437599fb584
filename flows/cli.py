"""The `racm3` command: demo, run, status, inspect, lineage. Users script against it; keep it stable."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_ROOT = "data"
EXIT_FAILED, EXIT_USAGE = 1, 2


def data_root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=os.environ.get("RACM3_DATA_ROOT", DEFAULT_ROOT),
                   help="data root (local folder or URL such as s3://bucket/racm3); "
                        "default $RACM3_DATA_ROOT or ./data")


def config_args(p: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    p.add_argument("--preset", default=default_preset, help="config preset: demo or paper")
    p.add_argument("--config", dest="config_file", help="TOML file overriding the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set filter.max_pwatermark=0.3 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="racm3", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the embedded demo end to end")
    data_root_arg(p)
    config_args(p)
    p.add_argument("--seed", type=int, default=None, help="demo data seed (default: demo.seed)")
    p.add_argument("--until", help="stop after this stage")
    p.add_argument("--force", action="store_true", help="recompute shards that are done")

    p = sub.add_parser("run", help="(re-)run one stage; done shards are skipped")
    p.add_argument("stage")
    data_root_arg(p)
    config_args(p)
    p.add_argument("--force", action="store_true", help="recompute shards that are done")
    p.add_argument("--local", action="store_true",
                   help="run without Prefect (same shards, same manifests)")
    p.add_argument("--retry-failed", action="store_true",
                   help="download only: fetch again the rows that failed for a transient reason "
                        "(timeouts, connection errors, 5xx, 429); every other row is kept")

    p = sub.add_parser("verify", help="re-hash every output against its manifest; corrupt "
                       "shards become stale (recomputed by the next run); exit 1 if any")
    p.add_argument("stage", nargs="?", help="only this stage (default: every stage)")
    data_root_arg(p)

    p = sub.add_parser("status", help="per stage: shards done / stale / missing / corrupt")
    data_root_arg(p)
    config_args(p)

    p = sub.add_parser("decode", help="write a document's image and its VQGAN reconstruction to a PNG")
    p.add_argument("key", help="document key (see `racm3 inspect \"select key from tokenize\"`)")
    data_root_arg(p)
    config_args(p)
    p.add_argument("--out", help="PNG path (default <key>.png)")

    p = sub.add_parser("deployments", help="prefect.yaml from the stage registry: print it, "
                       "--write it, or --check it (exit 1 if it differs)")
    p.add_argument("--write", action="store_true", help="rewrite prefect.yaml")
    p.add_argument("--check", action="store_true", help="exit 1 if prefect.yaml differs")

    p = sub.add_parser("recall", help="retrieval recall@1/3/5 on the held-out split (Table 4)")
    data_root_arg(p)
    for name in PLUGINS:
        plugin(name).add_parser(sub)
    return ap


# Commands that live in their own modules: each has `add_parser(sub)` (adds one or more
# subparsers, each with `set_defaults(run=...)`) and keeps its imports inside `run`.
PLUGINS: tuple[str, ...] = ("flows.inspect_cli", "flows.generate_cli", "flows.ablate", "flows.remove_cli", "flows.export_cli",
                            "flows.search_cli", "flows.novel_cli")


def plugin(name: str):
    import importlib

    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "racm3,pipelines")  # stage logs in the UI
    # racm3 logs between flows too (`racm3 seeds` between its demos): the console has them
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # The ephemeral Prefect server's default 20 s start-up budget fails on a loaded laptop.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    args = build_parser().parse_args(argv)
    from flows.console import setup_logging

    setup_logging(args.verbose)
    from pipelines.core.config import ConfigError
    from storage.lease import LeaseHeld

    try:
        run = COMMANDS.get(args.command) or args.run
        return run(args)
    except (ConfigError, FileNotFoundError, LeaseHeld) as e:
        print(f"racm3: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if not prefect_unreachable(e):
            raise
        print(PREFECT_HELP.format(
            error=str(e).split(".")[0],
            budget=os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")), file=sys.stderr)
        return EXIT_FAILED


PREFECT_HELP = """racm3: error: {error}.
The temporary Prefect server did not start in time (budget:
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, now {budget} s). Either
  - start a server once and point racm3 at it:
      prefect server start --host 127.0.0.1 --port 4200 &
      export PREFECT_API_URL=http://127.0.0.1:4200/api
  - or run without Prefect: racm3 run STAGE --local (same shards, same manifests)"""


def prefect_unreachable(e: BaseException) -> bool:
    """Whether `e` (or its cause) is the ephemeral Prefect server failing to start."""
    seen: BaseException | None = e
    while seen is not None:
        if "ephemeral Prefect API server" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from flows.pipeline import demo_flow, reports_of, steps
    from flows.summary import print_summary
    from pipelines.core.registry import config_to_dict, load_config

    cfgs = load_config(args.preset, args.config_file, args.overrides)  # once, for every stage
    if args.seed is not None:
        cfgs["demo"] = dataclasses.replace(cfgs["demo"], seed=args.seed)
    steps(cfgs, args.until)  # a bad --until fails before any flow starts
    state = demo_flow(data_root=args.data_root, until=args.until, config=config_to_dict(cfgs),
                      force=args.force, return_state=True)
    reports = reports_of(state)
    print_summary(reports, args.data_root, title="racm3 demo")
    print_report_location(args.data_root)
    return EXIT_FAILED if any(r.failed for r in reports) else 0


def print_report_location(data_root: str) -> None:
    from storage.fs import DataRoot

    root = DataRoot(data_root)
    path = root.artifact("evaluate", "main", "report.html")
    if root.exists(path):
        print(f"report: {root.url(path)}  (Markdown beside it; metrics: "
              f"{root.url(root.artifact('evaluate', 'main', 'metrics.json'))})")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.summary import print_summary
    from pipelines.core.registry import get_stage, load_config
    from storage.fs import DataRoot

    stage = get_stage(args.stage)
    overrides = list(args.overrides)
    if args.retry_failed:
        from pipelines.core.config import ConfigError
        from pipelines.ingest.downloader import TRANSIENT

        if args.stage != "download":
            raise ConfigError("--retry-failed", "applies to the download stage only")
        overrides.append(f"download.retry_statuses={list(TRANSIENT)!r}".replace("'", '"'))
    cfgs = load_config(args.preset, args.config_file, overrides)
    if args.local:
        from pipelines.core.runner import run_stage

        report = run_stage(stage.name, DataRoot(args.data_root), cfgs, force=args.force)
    else:
        from flows.stages import run_stage_flow

        report = run_stage_flow(args.stage, args.data_root, cfgs, force=args.force)
    print_summary([report], args.data_root, title=f"racm3 run {args.stage}")
    return EXIT_FAILED if report.failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipelines.core.registry import STAGES, get_stage, load_config
    from pipelines.core.stage import shard_states
    from storage.fs import DataRoot
    from storage.removal_audit import made_before_removal
    from storage.verify import corrupt_shards

    cfgs, root = load_config(args.preset, args.config_file, args.overrides), DataRoot(args.data_root)
    before_removal = made_before_removal(root)
    t = Table(title=f"racm3 status: {args.data_root}")
    for col in ("stage", "shards", "done", "stale", "missing", "corrupt", "note"):
        t.add_column(col)
    for name in STAGES:
        stage = get_stage(name)
        corrupt = len(corrupt_shards(root, name))
        try:
            states = shard_states(stage, root, cfgs[stage.section])
        except (FileNotFoundError, ValueError) as e:
            t.add_row(name, "-", "-", "-", "-", str(corrupt), f"waiting: {str(e)[:70]}")
            continue
        counts = {s: sum(1 for x in states if x.state == s) for s in ("done", "stale", "missing")}
        note = "corrupt shards are recomputed by `racm3 run`" if corrupt else ""
        if name in before_removal:
            note = (f"[yellow]{len(before_removal[name])} made before the latest removal: "
                    f"may use removed documents; re-run[/yellow]")
        t.add_row(name, str(len(states)), *(str(counts[s]) for s in ("done", "stale", "missing")),
                  f"[red]{corrupt}[/red]" if corrupt else "0", note)
    Console().print(t)
    from storage.removal_audit import outputs_using_removed

    for output, keys in outputs_using_removed(root).items():
        Console().print(f"[yellow]{output} used {len(keys)} removed document(s) "
                        f"({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}): re-run it[/yellow]",
                        soft_wrap=True)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipelines.core.registry import get_stage
    from storage.fs import DataRoot
    from storage.verify import verify

    if args.stage:
        get_stage(args.stage)  # an unknown stage name exits 2
    from storage.removal_audit import leftovers

    root = DataRoot(args.data_root)
    checked, findings = verify(root, args.stage)
    for f in findings:
        print(f"CORRUPT {f.stage}/{f.shard_id}: {'; '.join(f.problems)}")
    print(f"verified {checked} shards: {len(findings)} corrupt"
          + (" (marked stale: `racm3 run STAGE` recomputes them)" if findings else ""))
    left = [x for x in leftovers(root) if args.stage in (None, x.stage)]
    for x in left:
        print(f"REMOVED-DOCUMENTS {x.stage}/{x.shard_id}: still names {x.documents} removed "
              "document(s): re-run the pipeline to carry the removal through")
    if left:
        print(f"{len(left)} shards still hold removed documents")
    return EXIT_FAILED if findings or left else 0


def cmd_decode(args: argparse.Namespace) -> int:
    from pipelines.core.registry import load_config
    from pipelines.tokens.tokenize import decode_key
    from storage.fs import DataRoot

    cfgs = load_config(args.preset, args.config_file, args.overrides)
    try:
        out = decode_key(DataRoot(args.data_root), cfgs, args.key, args.out or f"{args.key}.png")
    except KeyError as e:
        print(f"racm3: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from flows.deployments import PATH, render

    text = render()
    if args.check:
        same = PATH.exists() and PATH.read_text() == text
        if not same:
            print(f"racm3: {PATH} differs from the registry: run `racm3 deployments --write`",
                  file=sys.stderr)
        return 0 if same else EXIT_FAILED
    if args.write:
        PATH.write_text(text)
        print(f"wrote {PATH}")
        return 0
    print(text, end="")
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    from pipelines.retrieval.recall import show_retrieval_eval
    from storage.fs import DataRoot

    print(show_retrieval_eval(DataRoot(args.data_root)))
    return 0


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "status": cmd_status, "verify": cmd_verify,
            "decode": cmd_decode, "recall": cmd_recall,
            "deployments": cmd_deployments}

if __name__ == "__main__":
    sys.exit(main())
