"""Flows under the real Prefect engine (prefect_test_harness: a temporary local server)."""

from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.stages import ShardFailed, shard_task, stage_flow
from pipelines.core.runner import StageReport
from storage.manifest import list_manifests


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_filter_and_download_flows(harness, served):
    root, _, overrides = served
    for stage in ("filter", "download"):
        d = stage_flow(stage)(data_root=root.uri, overrides=overrides)
        report = StageReport.from_dict(d)
        assert report.ok and report.ran
    manifests = list_manifests(root, "download")
    assert manifests and all(m.flow_run_id for m in manifests)
    again = StageReport.from_dict(stage_flow("download")(data_root=root.uri, overrides=overrides))
    assert again.ran == [] and len(again.skipped) == len(manifests)


def test_shard_task_runs_the_drivers_run_shard_without_an_engine(small_demo):
    from pipelines.core.driver import Job, shard_runner
    from pipelines.core.runconfig import BeamConfig, RunConfig
    from pipelines.ingest.filter import FilterStage
    from storage.lease import stage_lease

    root, cfgs, _ = small_demo
    job = Job(FilterStage(), root, cfgs["filter"], RunConfig(retries=0), BeamConfig(), root.owner)
    spec = FilterStage().plan(root, cfgs["filter"])[0]
    with stage_lease(root, "filter", RunConfig()):  # as the driver does: commits are fenced
        m = shard_task.fn("filter", spec, shard_runner(job))
    assert m.stage == "filter" and m.rows_in > 0 and m.flow_run_id is None
    with pytest.raises(ShardFailed, match="OSError: gone"):  # a failed shard fails its task run
        shard_task.fn("filter", spec, lambda s: (None, "OSError: gone"))
