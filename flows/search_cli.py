"""CLI plugin: `racm3 search` (what the retriever returns for a caption or an image, as text and HTML)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flows.cli import data_root_arg

    p = sub.add_parser("search", help="the memory's top documents for a caption or an image, with "
                       "scores and captions (and an HTML page with thumbnails)")
    data_root_arg(p)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--caption", default="", help="query caption")
    q.add_argument("--image", default="", help="query image file")
    p.add_argument("--memory", default="", metavar="ROOT",
                   help="search another data root's memory (its index must come from the same "
                        "encoder; default: the data root's own)")
    p.add_argument("--k", type=int, default=5, help="documents to return")
    p.add_argument("--out", default="search.html", help="HTML page to write ('' = none)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from pipelines.retrieval.lookup import (
        format_hits,
        html_page,
        jpeg_bytes,
        load_encoder,
        read_image,
        search,
    )
    from storage.fs import DataRoot

    if args.k < 1:
        print("racm3: error: --k must be >= 1", file=sys.stderr)
        return 2
    root = DataRoot(args.data_root)
    memory = DataRoot(args.memory) if args.memory else root
    try:
        encoder = load_encoder(root, args.device)
        image = read_image(args.image, encoder.image_side) if args.image else None
        hits = search(encoder, memory, args.k, args.caption, image)
    except (ValueError, FileNotFoundError) as e:  # MemoryMismatch is a ValueError
        print(f"racm3: error: {e}", file=sys.stderr)
        return 2
    query = args.caption or args.image
    print(f"query: {query}\nmemory: {memory.uri}")
    print(format_hits(hits))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(html_page(hits, query, jpeg_bytes(image) if image else None, memory.uri))
        print(f"page: {args.out}")
    return 0
