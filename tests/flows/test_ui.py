"""The Prefect UI, checked for real: a local Prefect server, the demo flow run against it, the
deployments registered with `prefect deploy --all`, and the flow run's page rendered in headless
Chromium (Debian's `chromium`). The screenshot is kept under build/ui/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SMALL_DEMO, free_port

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "build" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed; install Debian's "
                       "package as root: apt-get update && apt-get install -y chromium"),
]


def api(base: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(f"{base}/api{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"{base}/api", "PREFECT_API_URL": f"{base}/api"}
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(180):
            try:
                if api(base, "/health") is True:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy in 180 s")
        yield base, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chromium(url: str, out: Path, user_dir: Path) -> str:
    """Screenshot `url` to `out` and return the rendered DOM."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={user_dir}", "--window-size=1400,900",
             "--virtual-time-budget=20000"]
    subprocess.run([*flags, f"--screenshot={out}", url], check=True, capture_output=True,
                   timeout=180)
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                         timeout=180)
    return dom.stdout


def test_demo_run_deployments_and_ui(server, tmp_path):
    base, env = server
    data = tmp_path / "data"
    sets = [a for o in [*SMALL_DEMO, f"demo.port={free_port()}"] for a in ("--set", o)]
    bin_dir = Path(sys.executable).parent
    run = subprocess.run([str(bin_dir / "racm3"), "demo", "--until", "download", "--data-root",
                          str(data), *sets], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    runs = api(base, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
    flows = {f["id"]: f["name"] for f in api(base, "/flows/filter", {"limit": 50})}
    demo = [r for r in runs if flows[r["flow_id"]] == "racm3-end-to-end-demo"]
    assert demo and demo[0]["state_type"] == "COMPLETED"
    stage_runs = {flows[r["flow_id"]] for r in runs}
    assert {"racm3-demo", "racm3-filter", "racm3-download"} <= stage_runs
    artifacts = api(base, "/artifacts/filter", {"limit": 50})
    keys = {a["key"] for a in artifacts}
    assert {"racm3-filter", "racm3-download"} <= keys

    subprocess.run([str(bin_dir / "prefect"), "work-pool", "create", "racm3", "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=120)
    deploy = subprocess.run([str(bin_dir / "prefect"), "--no-prompt", "deploy", "--all"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    import yaml

    expected = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    deployed = {d["name"] for d in api(base, "/deployments/filter", {"limit": 100})}
    assert expected <= deployed

    SHOTS.mkdir(parents=True, exist_ok=True)
    run_id, run_name = demo[0]["id"], demo[0]["name"]
    dom = chromium(f"{base}/runs/flow-run/{run_id}", SHOTS / "flow-run.png", tmp_path / "c1")
    assert run_name in dom and "racm3-end-to-end-demo" in dom
    assert (SHOTS / "flow-run.png").stat().st_size > 20_000
    download_artifact = next(a for a in artifacts if a["key"] == "racm3-download")
    dom = chromium(f"{base}/artifacts/artifact/{download_artifact['id']}",
                   SHOTS / "artifact.png", tmp_path / "c2")
    assert "racm3-download" in dom and "rows out" in dom
