"""Read-only `racm3` commands: `inspect` (SQL over the shards' DuckDB views) and `lineage` (a
shard's upstream tree, a document's provenance, or the sources of a generated output)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from flows.cli import EXIT_USAGE, data_root_arg  # light: flows.cli loads its plugins lazily

KEY_RE = re.compile(r"^\d{3}-\d{9}$")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="SQL (DuckDB) over every stage's shards and `manifests`")
    data_root_arg(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("sql", nargs="?", help="a query; without one, list the views")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("lineage", help="ancestry of a shard or artifact, back to the metadata rows")
    data_root_arg(p)
    p.add_argument("path", help="path of a shard/artifact, relative to the data root or absolute, "
                               "or a document key (NNN-NNNNNNNNN): its URL, caption, licence, "
                               "metadata row and fetch, or a generated sample / page (its folder's "
                               "result.json or showcase.json): the documents it used")
    p.set_defaults(run=cmd_lineage)


def cmd_inspect(args: argparse.Namespace) -> int:
    from storage.fs import DataRoot
    from storage.views import connect, views

    root = DataRoot(args.data_root)
    if not args.sql:
        print("views: " + ", ".join(views(root)))
        return 0
    con = connect(root)
    import duckdb

    try:
        rel = con.sql(args.sql)
    except duckdb.Error as e:
        print(f"racm3: error: {e}\nviews: {', '.join(views(root))}", file=sys.stderr)
        return EXIT_USAGE
    if rel is None:
        return 0
    print(format_rows(rel.columns, rel.fetchall(), args.format))
    return 0


def format_rows(columns: list[str], rows: list[tuple[Any, ...]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=_json_default,
                          indent=1)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_cell(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(_cell(v) for v in r))
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(t)
    return console.export_text().rstrip("\n")


def _cell(v: Any) -> str:
    if isinstance(v, bytes | bytearray):
        return f"<{len(v)} bytes>"
    return "" if v is None else str(v)


def _json_default(v: Any) -> Any:
    return f"<{len(v)} bytes>" if isinstance(v, bytes | bytearray) else str(v)


def cmd_lineage(args: argparse.Namespace) -> int:
    from storage.fs import DataRoot
    from storage.lineage import render, walk

    root = DataRoot(args.data_root)
    if KEY_RE.match(args.path):  # a document key: where it came from
        return print_provenance(root, args.path)
    node = walk(root, args.path)
    if node.manifest is None:
        if (rc := print_output_sources(root, args.path)) is not None:
            return rc
        print(f"racm3: error: no manifest lists {args.path} as an output under {args.data_root}",
              file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(render(node)))
    from storage.removal_audit import outputs_using_removed

    m = node.manifest
    if (keys := outputs_using_removed(root).get(f"{m.stage}/{m.shard_id}")):
        print(f"FLAGGED: {m.stage}/{m.shard_id} used {len(keys)} removed document(s): "
              f"{', '.join(keys)}")
    return 0


def print_output_sources(root: Any, path: str) -> int | None:
    """A generated sample or page (a folder with result.json, or showcase.json): the memory
    documents it used, each back to its metadata row, removed ones flagged; None if it is not one."""
    from storage.fs import DataRoot
    from storage.removal_audit import removed_keys

    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    record = next((os.path.join(folder, n) for n in ("result.json", "showcase.json")
                   if os.path.exists(os.path.join(folder, n))), None)
    if record is None:
        return None
    with open(record) as f:
        rec = json.load(f)
    memory = DataRoot(rec["memory"]) if rec.get("memory") else root
    keys = list(rec.get("documents", []))
    removed = removed_keys(memory) & set(keys)
    print(f"{path}: made from {len(keys)} memory document(s) of {memory.uri} ({record})")
    for key in keys:
        if key in removed:
            print(f"FLAGGED: {key} has been removed")
        print_provenance(memory, key, missing_ok=True)
    return 0


def print_provenance(root: Any, key: str, missing_ok: bool = False) -> int:
    from storage.provenance import fetched, provenance

    p = provenance(root, [key]).get(key)
    if p is None:
        print(f"{'' if missing_ok else 'racm3: error: '}no filter shard covers document {key}",
              file=sys.stdout if missing_ok else sys.stderr)
        return 0 if missing_ok else EXIT_USAGE
    print(f"document {key}\n  url: {p.url}\n  caption: {p.caption}\n  license: {p.license}\n"
          f"  metadata: {p.metadata_file} row {p.metadata_row}\n  filter shard: {p.filter_shard}"
          f"\n  download shard: {p.download_shard or '-'} (fetched {fetched(p)})")
    return 0
