"""Flows under the real Prefect engine (prefect_test_harness: a temporary local server)."""

from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.stages import STAGE_FLOWS, shard_task
from pipelines.core.runner import StageReport
from storage.manifest import list_manifests


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_filter_and_download_flows(harness, served):
    root, _, overrides = served
    for stage in ("filter", "download"):
        d = STAGE_FLOWS[stage](data_root=root.uri, overrides=overrides)
        report = StageReport.from_dict(d)
        assert report.ok and report.ran
    manifests = list_manifests(root, "download")
    assert manifests and all(m.flow_run_id for m in manifests)
    again = StageReport.from_dict(STAGE_FLOWS["download"](data_root=root.uri, overrides=overrides))
    assert again.ran == [] and len(again.skipped) == len(manifests)


def test_shard_task_fn_runs_without_an_engine(small_demo):
    root, cfgs, _ = small_demo
    from pipelines.ingest.filter import FilterStage

    spec = FilterStage().plan(root, cfgs["filter"])[0]
    m = shard_task.fn("filter", root, cfgs["filter"], spec)
    assert m.stage == "filter" and m.rows_in > 0 and m.flow_run_id is None
