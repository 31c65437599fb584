"""Deployments really run: a local Prefect server, a `process` work pool and a worker execute a
stage deployment and the end-to-end demo deployment from prefect.yaml, triggered with
`prefect deployment run`, to Completed, with their shards on disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.fs import DataRoot
from storage.manifest import list_manifests
from tests.conftest import SMALL_DEMO, free_port
from tests.flows.test_ui import api, server  # noqa: F401 - the server fixture

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def prefect(env: dict, *args: str, timeout: int = 600) -> str:
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def trigger(env: dict, deployment: str, params: dict) -> str:
    out = prefect(env, "deployment", "run", deployment, "--params", json.dumps(params))
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, out
    return m.group(1)


def wait_terminal(base: str, run_id: str, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api(base, f"/flow_runs/{run_id}")
        assert isinstance(run, dict)
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(3)
    pytest.fail(f"flow run {run_id} not finished after {timeout_s} s")


def test_stage_and_end_to_end_deployments_run_on_a_worker(server, tmp_path):  # noqa: F811
    base, env = server
    prefect(env, "work-pool", "create", "racm3", "--type", "process")
    prefect(env, "deploy", "-n", "demo-nightly", "-n", "filter")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "racm3"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        data = str(tmp_path / "data")
        overrides = [*SMALL_DEMO, f"demo.port={free_port()}"]
        demo_id = trigger(env, "racm3-end-to-end-demo/demo-nightly",
                          {"data_root": data, "until": "download", "overrides": overrides})
        run = wait_terminal(base, demo_id)
        assert run["state_type"] == "COMPLETED", run["state"]
        root = DataRoot(data)
        assert list_manifests(root, "download") and root.glob("download/*.parquet")

        filter_id = trigger(env, "racm3-filter/filter",
                            {"data_root": data, "overrides": overrides, "force": True})
        run = wait_terminal(base, filter_id)
        assert run["state_type"] == "COMPLETED", run["state"]
        manifests = list_manifests(root, "filter")
        assert manifests and {m.flow_run_id for m in manifests} == {filter_id}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
