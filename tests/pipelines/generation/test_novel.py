"""The novel-entity experiment: entities no training document shows, a second memory of them
made with the trained root's encoders, and an evaluation with that memory swapped in."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace

import pyarrow.parquet as pq

from flows.novel_cli import run_novel
from pipelines.core.driver import InProcess, drive
from pipelines.core.registry import load_config
from pipelines.demo.data import DemoDataConfig, NovelDataStage, make_entities
from pipelines.demo.paths import coco_dir, metadata_path
from pipelines.inference.memory import fingerprints
from pipelines.retrieval.embed import EmbedConfig
from storage.fs import DataRoot
from tests.pipelines.generation.conftest import TOK
from tests.pipelines.generation.test_memory_swap import IN_MEMORY
from tests.pipelines.retrieval.retrieval_helpers import CKPT

DEMO = DemoDataConfig(entities=20)  # images of 256-320 px: the filter drops smaller ones


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_novel_entities_never_appear_in_training_documents(tmp_path):
    root = DataRoot(str(tmp_path / "novel"))
    assert not drive(NovelDataStage(entities=5, docs=2), root, {"demo": DEMO}, InProcess()).failed
    trained = {e.name for e in make_entities(DEMO)}
    meta = pq.read_table(metadata_path(root)).to_pydict()
    coco = json.load(open(os.path.join(coco_dir(root), "captions_test.json")))
    novel = set(coco["racm3_entities"].values())
    assert len(novel) == 5 and len(coco["images"]) == 5 and len(meta["TEXT"]) == 10
    for text in meta["TEXT"] + [a["caption"] for a in coco["annotations"]]:
        words = set(text.replace(",", " ").split())
        assert words & novel and not words & trained, text  # names a novel entity, no trained one


def test_racm3_novel_builds_the_memory_and_evaluates_with_it(trained_root, tmp_path):
    mem = DataRoot(str(tmp_path / "novel"))
    cfgs = load_config("demo")
    cfgs |= {"demo": replace(DEMO, port=free_port()), "tokenize": TOK, "beam": IN_MEMORY,
             "embed": EmbedConfig(checkpoint=CKPT), "download": replace(cfgs["download"], threads=2),
             "evaluate": replace(cfgs["evaluate"], generate=False, bootstrap=0, shard_images=0,
                                 batch_images=4)}
    reports = run_novel(trained_root, mem, cfgs, entities=4, docs=2)
    assert not any(r.failed for r in reports), [(r.stage, r.failed) for r in reports]
    assert fingerprints(mem) == fingerprints(trained_root)  # the trained root's encoders
    metrics = json.load(open(trained_root.artifact("evaluate", "novel", "metrics.json")))
    assert metrics["settings"]["memory"] == mem.uri and metrics["settings"]["images"] == 4
    assert metrics["leakage_guard"]["excluded_memory_docs"] >= 0
    assert "ra-cm3" in metrics["models"] and "vanilla" in metrics["models"]
    # every document in context came from the novel memory, never the training root's
    part = json.load(open(trained_root.artifact("evaluate-part", "novel-000000-000004", "json")))
    novel_keys = set(pq.read_table(mem.artifact("index", "main", "keys.parquet"))["key"].to_pylist())
    used = {k for rec in part["images"] for keys in rec["context"].values() for k in keys}
    assert used and used <= novel_keys
    assert set(metrics["context_same_entity"]) == {"caption_query", "image_query"}
    table = trained_root.fs.read_text(trained_root.artifact("evaluate", "novel", "table.md"))
    ppl = next(line for line in table.splitlines() if line.startswith("| image ppl"))
    assert "RA-CM3 (novel memory)" in table and f"| {metrics['models']['ra-cm3']['image ppl']:.4g} |" in ppl
