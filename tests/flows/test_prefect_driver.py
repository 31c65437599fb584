"""The one driver under the real Prefect engine: the run policy takes effect as it does with
--local, a failed shard makes the flow run Failed, and the artifacts say which shard and why."""

from __future__ import annotations

import asyncio

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.stages import report_of, run_in_flow
from pipelines.core.runconfig import RunConfig
from storage.manifest import list_manifests
from tests.pipelines.core.toy_stage import Counters, ToyStage, toy_cfgs


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def fresh_counters():
    Counters.reset()


def run_toy(root, cfgs, force=False):
    @flow(name="racm3-toy")
    def toy_flow():
        return run_in_flow(ToyStage(), root, cfgs, force)

    return toy_flow(return_state=True)


async def artifacts_of(flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as c:
        arts = await c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def test_concurrency_retries_and_progress(harness, root):
    state = run_toy(root, toy_cfgs(RunConfig(shard_concurrency=3, retries=2), shards=6,
                                   fail_times=2, sleep_s=0.3))
    report = report_of(state)
    assert state.is_completed() and report.ok and len(report.ran) == 6
    assert Counters.max_running == 3  # max_workers from run.shard_concurrency, not hard-coded
    assert all(n == 3 for n in Counters.attempts.values())  # Prefect retried each shard twice
    assert all(m.flow_run_id == str(state.state_details.flow_run_id)
               for m in list_manifests(root, "toy"))
    arts = asyncio.run(artifacts_of(state.state_details.flow_run_id))
    assert arts["racm3-toy-progress"].data == 100.0


def test_failed_shard_fails_the_flow_run(harness, root):
    state = run_toy(root, toy_cfgs(RunConfig(retries=1, shard_timeout_s=1.0), hang="002", shards=3,
                                   fail_times=5, sleep_s=0))
    assert state.is_failed() and "shards failed" in state.message
    report = report_of(state)
    assert set(report.failed) == {"000", "001", "002"}
    assert "ShardTimeout" in report.failed["002"] and "OSError" in report.failed["000"]
    assert Counters.attempts["002"] == 1 and Counters.attempts["000"] == 2
    assert Counters.hang_exit and float(Counters.hang_exit[0]) < 10
    arts = asyncio.run(artifacts_of(state.state_details.flow_run_id))
    md = arts["racm3-toy-failures"].data
    assert "| 002 | ShardTimeout" in md and "| 000 | OSError: flaky attempt 2" in md


def test_cli_exits_1_with_failed_shards_on_both_paths(harness, small_demo, capsys):
    from flows.cli import main

    root, _, overrides = small_demo
    sets = [a for o in [*overrides, "run.shard_timeout_s=0.001"] for a in ("--set", o)]
    for path in (["--local"], []):  # in-process, then the Prefect flow (the harness's server)
        code = main(["run", "filter", *path, "--data-root", root.uri, *sets])
        out = capsys.readouterr().out
        assert code == 1, path
        assert "FAILED filter/" in out and "ShardTimeout" in out and "run.shard_timeout_s" in out


def test_ephemeral_server_timeout_is_a_message_not_a_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    racm3 = str(Path(sys.executable).parent / "racm3")
    r = subprocess.run([racm3, "run", "filter", "--data-root", str(tmp_path / "d")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "prefect server start" in r.stderr
    assert "PREFECT_API_URL" in r.stderr and "--local" in r.stderr
