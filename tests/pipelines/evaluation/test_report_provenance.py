"""The evaluation report's provenance and decontamination sections, and the flags `racm3 status` /
`racm3 lineage` raise on an evaluation whose retrieved documents include a removed one."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard
from pipelines.evaluation.report import decontamination_section
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.removal_audit import outputs_using_removed
from storage.removals import append, entries
from tests.pipelines.evaluation.test_evaluate import (  # noqa: F401  (the module's fixtures)
    EVAL,
    run_evaluation,
    trained,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_report_lists_sources_and_flags_an_evaluation_that_used_a_removed_document(trained, capsys):  # noqa: F811
    run_evaluation(trained, EVAL)
    md = open(trained.artifact("evaluate", "main", "report.md")).read()
    page = open(trained.artifact("evaluate", "main", "report.html")).read()
    shown = {k for part in list_manifests(trained, "evaluate-part") for rel in part.outputs
             if rel.endswith(".json")
             for ex in json.load(open(trained.join(rel)))["show"]
             for ks in ex["documents"].values() for k in ks}
    assert shown  # the shown examples retrieved documents
    for text in (md, page):
        assert "Sources of the retrieved documents" in text and "Decontamination" in text
        # the synthetic shards have no filter shard: each key is listed with '—' for its origin
        assert all(k.replace("-", "\\-") in md or k in page for k in shown)
    assert "the decontaminate stage did not run" in page

    used = {k for part in list_manifests(trained, "evaluate-part") for rel in part.outputs
            if rel.endswith(".json") for im in json.load(open(trained.join(rel)))["images"]
            for ks in im["context"].values() for k in ks}
    victim = sorted(used)[0]
    assert outputs_using_removed(trained) == {}
    append(trained, entries("key", [victim], "test", "flag check"))
    flagged = outputs_using_removed(trained)
    assert flagged["evaluate/main"] == [victim]
    assert any(k.startswith("evaluate-part/") for k in flagged)
    capsys.readouterr()
    assert main(["status", "--data-root", trained.path]) == 0
    assert "evaluate/main used 1 removed document(s)" in capsys.readouterr().out
    assert main(["lineage", "--data-root", trained.path, "evaluate/main.report.html"]) == 0
    assert f"FLAGGED: evaluate/main used 1 removed document(s): {victim}" in capsys.readouterr().out


class _Train(Stage):
    """A train manifest with the counts the train stage records (decontaminated_by_split)."""

    name = "train"
    version = "test"

    def __init__(self, counts: dict[str, int]):
        self.counts = counts

    def run_shard(self, ctx, resources):
        with ctx.root.fs.open(ctx.output_path("pt"), "wb") as f:
            f.write(b"weights")
        return ShardResult(metrics={"decontaminated_by_split": self.counts})


def test_decontamination_counts_per_evaluation_set_and_checkpoint(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    execute_shard(_Train({"coco/dev.json": 3, "coco/test.json": 1}), root, None,
                  ShardSpec("train", "ra-cm3", ()))
    execute_shard(_Train({"coco/dev.json": 2}), root, None, ShardSpec("train", "vanilla", ()))
    title, note, header, rows = decontamination_section(
        root, {"settings": {"checkpoints": {"ra-cm3": "ra-cm3", "vanilla": "vanilla",
                                            "other": "missing"}}})
    assert header == ["evaluation set", "ra-cm3", "vanilla", "other"]
    assert rows == [["coco/dev.json", "3", "2", "—"], ["coco/test.json", "1", "0", "—"]]
    assert "kept out of training" in note
