"""CLI plugin: `racm3 generate` (caption -> image, image -> caption, infilling, guidance) and
`racm3 classify` (few-shot classification, paper §5.4)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flows.cli import data_root_arg

    p = sub.add_parser("generate", help="caption -> image or image -> caption with a trained "
                       "checkpoint; --infill edits a box of an image (paper §5)")
    data_root_arg(p)
    p.add_argument("--caption", default="", help="prompt caption (caption -> image; infilling)")
    p.add_argument("--image", default="", help="prompt image file (image -> caption; infilling)")
    p.add_argument("--infill", default="", metavar="X0,Y0,X1,Y1",
                   help="infill this box of --image (token-grid cells, end-exclusive)")
    p.add_argument("--variant", default="ra-cm3", help="checkpoint train/<variant>.pt")
    p.add_argument("--k", type=int, default=-1,
                   help="documents retrieved with the prompt (default 2; 0 for vanilla)")
    p.add_argument("--context", nargs="+", default=[], metavar="KEY",
                   help="use these memory documents (by key) instead of retrieval")
    p.add_argument("--context-image", action="append", default=[], metavar="FILE",
                   help="a user document's image (pair each with --context-caption)")
    p.add_argument("--context-caption", action="append", default=[], metavar="TEXT")
    p.add_argument("--samples", type=int, default=4, help="sample N, rerank (CLIP / perplexity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-caption-tokens", type=int, default=24)
    p.add_argument("--min-caption-tokens", type=int, default=1,
                   help="image -> caption: the end token is refused before this many (0 = allow empty)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight of the caption (0 = off)")
    p.add_argument("--doc-guidance", type=float, default=0.0,
                   help="guidance weight of the in-context documents (0 = off)")
    p.add_argument("--ensemble", type=int, default=0, metavar="K",
                   help="caption -> image from K documents as an ensemble of 2-document passes")
    p.add_argument("--out", default="generated", help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="retrieval at inference: retrieve.<field> (default: the retrieve stage's "
                   "values) or embed.model (must be the index's)")
    p.add_argument("--memory", default="", metavar="ROOT",
                   help="retrieve from another data root's memory (its index, key map and token "
                   "shards; made with this root's CLIP, VQGAN and BPE)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("classify", help="one/few-shot classification accuracy vs k, RA-CM3 vs "
                       "vanilla, semantic and non-semantic labels (paper §5.4, Fig 8)")
    data_root_arg(p)
    p.add_argument("--coco", default="", help="COCO captions JSON with racm3_entities "
                   "(default: the demo's test split, else its held-out split)")
    p.add_argument("--ks", default="0,1,2,4", help="numbers of passes (k-shot) to report")
    p.add_argument("--tasks", type=int, default=40, help="binary tasks (entity pairs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the table as JSON here")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_classify)

    p = sub.add_parser("showcase", help="the README's §5 pictures and numbers: infilling, "
                       "controlled generation, guidance sweep (RA-CM3 vs vanilla)")
    data_root_arg(p)
    p.add_argument("--coco", default="", help="labelled COCO split (default: demo test split)")
    p.add_argument("--images", type=int, default=32, help="test images measured")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt (best CLIP kept)")
    p.add_argument("--weights", default="0,1,3", help="caption guidance weights (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/capabilities")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_showcase)


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.generation.request import Request, generate
    from storage.fs import DataRoot

    req = Request(caption=args.caption, image=args.image, box=args.infill, variant=args.variant,
                  k=args.k, context_keys=tuple(args.context),
                  context_images=tuple(args.context_image),
                  context_captions=tuple(args.context_caption), samples=args.samples,
                  seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                  max_caption_tokens=args.max_caption_tokens,
                  min_caption_tokens=args.min_caption_tokens, guidance_caption=args.guidance,
                  guidance_documents=args.doc_guidance, ensemble=args.ensemble, out=args.out,
                  device=args.device, sets=tuple(args.sets),
                  memory=DataRoot(args.memory).uri if args.memory else "")
    try:
        rec = generate(DataRoot(args.data_root), req)
    except (ValueError, KeyError) as e:
        print(f"racm3: error: {e}", file=sys.stderr)
        return 2
    print(f"{rec['mode']}: {len(rec['files'])} file(s) in {args.out}; context: "
          f"{', '.join(rec['context']) or 'none'}")
    for c, s in zip(rec["captions"], rec["scores"], strict=False):
        print(f"  {s:8.2f}  {c}")
    print(f"page: {rec['page']}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from pipelines.generation.fewshot import FewShotConfig, format_table, run_fewshot
    from storage.fs import DataRoot

    try:
        cfg = FewShotConfig(coco=args.coco, ks=tuple(int(k) for k in args.ks.split(",")),
                            tasks=args.tasks, seed=args.seed, device=args.device)
        result = run_fewshot(DataRoot(args.data_root), cfg)
    except ValueError as e:
        print(f"racm3: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"table: {args.out}")
    return 0


def cmd_showcase(args: argparse.Namespace) -> int:
    import json

    from pipelines.generation.showcase import ShowcaseConfig, run_showcase
    from storage.fs import DataRoot

    cfg = ShowcaseConfig(coco=args.coco, images=args.images, samples=args.samples,
                         weights=tuple(float(w) for w in args.weights.split(",")), seed=args.seed,
                         out=args.out, device=args.device)
    try:
        res = run_showcase(DataRoot(args.data_root), cfg)
    except ValueError as e:
        print(f"racm3: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    print(f"pictures and showcase.json in {args.out}")
    return 0
