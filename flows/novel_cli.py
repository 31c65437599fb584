"""CLI plugin: `racm3 novel`, the novel-entity experiment (paper §1, §5.1; RDM's memory swap):
entities no training document shows, in a second memory built with the trained root's CLIP,
VQGAN and BPE; RA-CM3 with that memory vs vanilla vs the retrieval baseline on a test split of
them (evaluate with `evaluate.memory`), as a table beside the metrics (evaluate/novel.table.md).
Not part of `racm3 demo`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

MEMORY_STAGES = ("filter", "download", "embed", "tokenize", "index")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flows.cli import config_args, data_root_arg

    p = sub.add_parser("novel", help="novel entities: a second memory of entities never trained "
                       "on; RA-CM3 with it vs vanilla vs the retrieval baseline")
    data_root_arg(p)
    config_args(p)
    p.add_argument("--memory-root", default="",
                   help="where the novel memory is built (default: <data-root>-novel)")
    p.add_argument("--entities", type=int, default=40, help="novel entities (one test image each)")
    p.add_argument("--docs", type=int, default=3, help="memory documents per novel entity")
    p.add_argument("--images", type=int, default=0, help="test images evaluated (0 = all)")
    p.add_argument("--force", action="store_true", help="recompute shards that are up to date")
    p.set_defaults(run=cmd_novel)


def memory_configs(root: Any, cfgs: dict[str, Any]) -> dict[str, Any]:
    """The memory root's configs: tokenize and embed with the trained root's VQGAN, BPE and CLIP
    (absolute locations), so the memory's fingerprints are the checkpoints'."""
    from pipelines.tokens.tokenizers import checkpoint_path, text_tokenizer_spec

    tok, emb = cfgs["tokenize"], cfgs["embed"]
    text = tok.text_tokenizer if tok.text_tokenizer == "openclip" else text_tokenizer_spec(root, tok)
    return {**cfgs,
            "tokenize": dataclasses.replace(tok, checkpoint=checkpoint_path(root, tok),
                                            text_tokenizer=text),
            "embed": dataclasses.replace(emb, checkpoint=root.url(root.resolve(emb.checkpoint)))}


def run_novel(root: Any, mem: Any, cfgs: dict[str, Any], entities: int, docs: int,
              images: int = 0, force: bool = False) -> list[Any]:
    """Build the novel memory in `mem` (demo-style stages, the trained root's encoders) and
    evaluate `root`'s checkpoints on its test split with it as the memory (evaluate/novel)."""
    from pipelines.core.driver import InProcess, drive
    from pipelines.core.registry import get_stage
    from pipelines.demo.data import NovelDataStage
    from pipelines.demo.paths import coco_dir, www_dir
    from pipelines.demo.server import serve_root_dir

    mcfgs = memory_configs(root, cfgs)
    reports = [drive(NovelDataStage(entities, docs), mem, mcfgs, InProcess(), force)]
    demo = cfgs["demo"]
    with serve_root_dir(mem, www_dir(mem), demo.host, demo.port):
        for stage in MEMORY_STAGES:
            reports.append(drive(get_stage(stage), mem, mcfgs, InProcess(), force))
    ev = dataclasses.replace(cfgs["evaluate"], coco=mem.url(coco_dir(mem) + "/captions_test.json"),
                             memory=mem.uri, name="novel", max_images=images)
    for stage in ("evaluate-part", "evaluate"):
        reports.append(drive(get_stage(stage), root, {**cfgs, "evaluate": ev}, InProcess(), force))
    if not any(r.failed for r in reports):
        write_table(root)
    return reports


def write_table(root: Any) -> str:
    """evaluate/novel.table.md beside evaluate/novel.metrics.json: RA-CM3 (novel memory) vs
    vanilla vs the retrieval baseline, with intervals; its path."""
    from pipelines.ablation.novel_table import novel_markdown

    with root.fs.open(root.artifact("evaluate", "novel", "metrics.json")) as f:
        metrics = json.load(f)
    path = root.artifact("evaluate", "novel", "table.md")
    root.write_bytes_atomic(path, (novel_markdown(metrics) + "\n").encode())
    return path


def cmd_novel(args: argparse.Namespace) -> int:
    from flows.cli import EXIT_FAILED
    from flows.summary import print_summary
    from pipelines.core.config import ConfigError
    from pipelines.core.registry import load_config
    from storage.fs import DataRoot

    root = DataRoot(args.data_root)
    mem = DataRoot(args.memory_root or f"{root.uri.rstrip('/')}-novel")
    if mem.uri == root.uri:
        raise ConfigError("--memory-root", "must be another data root than --data-root")
    cfgs = load_config(args.preset, args.config_file, list(args.overrides))
    reports = run_novel(root, mem, cfgs, args.entities, args.docs, args.images, args.force)
    print_summary(reports, args.data_root, title="racm3 novel")
    if any(r.failed for r in reports):
        return EXIT_FAILED
    print(root.fs.read_text(root.artifact("evaluate", "novel", "table.md")))
    return 0
