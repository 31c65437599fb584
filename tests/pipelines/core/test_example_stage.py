"""docs/adding-a-stage.md's worked example: registered with one line, run through the driver,
with its config section, CLI, Prefect flow and skip-when-done all derived from the class."""

from __future__ import annotations

import pytest

from flows.cli import main
from pipelines.core import registry
from pipelines.core.runner import run_stage
from storage.shards import read_table

REF = "tests.pipelines.core.example_stage:CaptionStatsStage"


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(registry.STAGES, "caption-stats", REF)  # the one registry line


def test_example_stage_runs_through_the_driver(registered, small_demo, capsys):
    root, _, overrides = small_demo
    cfgs = registry.load_config("demo", overrides=overrides)
    filtered = run_stage("filter", root, cfgs)
    assert filtered.ok
    cfgs = registry.load_config("demo", overrides=[*overrides, "caption_stats.min_words=3"])
    report = run_stage("caption-stats", root, cfgs)
    assert report.ok and report.ran == filtered.ran and report.rows_in == filtered.rows_out
    t = read_table(root, root.join("caption-stats", "000-00000.parquet"))
    assert t.column_names == ["key", "words", "chars"] and min(t["words"].to_pylist()) >= 3
    assert report.rows_in == report.rows_out + report.dropped.get("short_caption", 0)
    assert run_stage("caption-stats", root, cfgs).skipped == report.ran

    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["run", "caption-stats", "--local", "--data-root", root.uri, *sets,
                 "--set", "caption_stats.min_words=-1"]) == 2
    assert "caption_stats.min_words" in capsys.readouterr().err
