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


def test_one_registry_line_gives_flow_deployment_cli_and_plan(registered, tmp_path, monkeypatch):
    """docs/adding-a-stage.md's promise: nothing else is edited, prefect.yaml included."""
    import yaml
    from prefect import Flow

    import flows.stages
    from flows import deployments
    from flows.cli import build_parser
    from flows.pipeline import steps

    flow = flows.stages.caption_stats_stage_flow  # prefect.yaml's entrypoint attribute
    assert isinstance(flow, Flow) and flow.name == "racm3-caption-stats"
    entries = {d["name"]: d for d in yaml.safe_load(deployments.render())["deployments"]}
    assert entries["caption-stats"]["entrypoint"] == "flows/stages.py:caption_stats_stage_flow"
    assert entries["caption-stats"]["parameters"]["preset"] == "demo"
    assert build_parser().parse_args(["run", "caption-stats"]).stage == "caption-stats"
    assert [s for s, _ in registry.plan()][-1] == "caption-stats"  # after its upstream, filter
    labels = [s.label for s in steps(registry.load_config("demo"), until="caption-stats")]
    assert labels.index("caption-stats") > labels.index("filter")
    # the committed prefect.yaml is now stale, and `racm3 deployments --write` is the whole edit
    out = tmp_path / "prefect.yaml"
    out.write_text((deployments.PATH).read_text())
    monkeypatch.setattr(deployments, "PATH", out)
    assert main(["deployments", "--check"]) == 1
    assert main(["deployments", "--write"]) == 0 and "caption_stats_stage_flow" in out.read_text()
    assert main(["deployments", "--check"]) == 0
