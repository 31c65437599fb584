"""`racm3 remove`: take documents out on request (keys, URLs, domains, image sha256) and apply it."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

KIND_ARGS = (("keys", "key"), ("urls", "url"), ("domains", "domain"), ("sha256", "sha256"))


def add_parser(sub: Any) -> None:
    from flows.cli import config_args, data_root_arg

    p = sub.add_parser("remove", help="remove documents on request: recorded in the data root's "
                       "removal list, dropped by every stage from then on")
    data_root_arg(p)
    config_args(p)
    for flag, kind in KIND_ARGS:
        p.add_argument(f"--{flag}", action="append", default=[], metavar="FILE",
                       help=f"a file with one {kind} a line (# comments allowed); repeatable")
    p.add_argument("--who", default=os.environ.get("USER") or _user(), help="who asked (recorded)")
    p.add_argument("--why", default="", help="why (recorded), e.g. a ticket number")
    p.add_argument("--no-apply", action="store_true",
                   help="only record; by default filter and download run now so the removed "
                        "bytes leave the data root at once")
    p.set_defaults(run=run)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run(args: argparse.Namespace) -> int:
    from flows.cli import EXIT_FAILED, EXIT_USAGE
    from pipelines.ingest.removal import apply_removals, keys_of_sha256, match_removals
    from storage import removals
    from storage.fs import DataRoot

    try:
        wanted = [(kind, removals.read_request(path, kind))
                  for flag, kind in KIND_ARGS for path in getattr(args, flag)]
    except removals.RemovalError as e:
        print(f"racm3: error: {e} (nothing was recorded)", file=sys.stderr)
        return EXIT_USAGE
    if not any(values for _, values in wanted):
        print("racm3: error: nothing to remove: give --keys, --urls, --domains or --sha256 FILE",
              file=sys.stderr)
        return EXIT_USAGE
    root = DataRoot(args.data_root)
    entries = [r for kind, values in wanted for r in removals.entries(kind, values, args.who, args.why)]
    found = match_removals(root, entries)
    # an image removed by its bytes is removed by its keys too, so filter drops its URL rows
    shas = {e.value for e in entries if e.kind == "sha256"}
    for key, sha in sorted(keys_of_sha256(root, shas).items()):
        entries += removals.entries("key", [key], args.who, f"sha256 {sha}; {args.why}".strip("; "))
    new = removals.append(root, entries)
    for entry in entries:
        if (entry.kind, entry.value) not in found:
            continue  # a key resolved from a sha256 entry
        n = found[(entry.kind, entry.value)]
        print(f"{entry.kind} {entry.value}: {n} document{'s' * (n != 1)}"
              + ("" if n else "  (matches nothing now; recorded for future data)"))
    print(f"recorded {new} new entr{'ies' if new != 1 else 'y'} in {root.url(root.join(removals.PATH))}")
    if args.no_apply:
        print("not applied: `racm3 run filter` and `racm3 run download` apply it")
        return 0
    ok = apply_removals(root, args.preset, args.config_file, args.overrides)
    print("applied: filter and download re-ran; run the pipeline (`racm3 demo` or each stage) to "
          "carry the removal into embeddings, tokens, the index, neighbours and checkpoints; "
          "`racm3 status` flags what was made before it, `racm3 verify` checks nothing remains")
    return 0 if ok else EXIT_FAILED
