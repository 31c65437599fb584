"""prefect.yaml: generated from the registry (`racm3 deployments`), every entrypoint a Prefect flow
with valid parameters, and schedules that never collide."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from prefect import Flow

from flows import deployments as gen
from flows.cli import main
from pipelines.core.registry import STAGES, plan

ROOT = Path(__file__).resolve().parents[2]


def committed() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_committed_prefect_yaml_is_the_generated_one(tmp_path, monkeypatch):
    assert (ROOT / "prefect.yaml").read_text() == gen.render()  # else: racm3 deployments --write
    assert main(["deployments", "--check"]) == 0
    stale = tmp_path / "prefect.yaml"
    stale.write_text(gen.render().replace("cron: 0 1 ", "cron: 0 2 "))
    monkeypatch.setattr(gen, "PATH", stale)
    assert main(["deployments", "--check"]) == 1
    assert main(["deployments", "--write"]) == 0 and stale.read_text() == gen.render()


def test_every_entrypoint_is_a_flow_and_parameters_match():
    names = set()
    for d in committed():
        path, attr = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, attr)
        assert isinstance(flow, Flow), d["entrypoint"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(d.get("parameters", {})) <= accepted, d["name"]
        assert d["work_pool"]["name"] == "racm3" and d["schedules"][0]["cron"]
        names.add(d["name"])
    # one deployment per stage run (train: one per variant) but the demo data, plus the end-to-end
    assert names == {"demo-nightly", "pipeline-nightly",
                     *("-".join([s, *map(str, f.values())]) for s, f in plan() if s != "demo")}
    assert {"train-ra-cm3", "train-vanilla", "evaluate-part"} <= names


def start_minute(cron: str) -> int:
    minute, hour, *_ = cron.split()
    return int(hour) * 60 + int(minute)


def test_deployments_sharing_a_lease_or_a_dependency_never_fire_together():
    """Read from the committed file: a deployment that shares a stage lease with another, or runs
    a stage downstream of another's, starts only once the other is expected done."""
    order = {s: i for i, s in enumerate(STAGES)}
    slots = {d.name: d for d in gen.timeline()}
    windows = []
    for d in committed():
        start = start_minute(d["schedules"][0]["cron"])
        stages = slots[d["name"]].stages
        windows.append((d["name"], start, start + slots[d["name"]].minutes, stages))
    assert all(end <= 24 * 60 for *_, end, _ in windows)
    for i, (a, a0, a1, sa) in enumerate(windows):
        for b, b0, b1, sb in windows[i + 1:]:
            related = set(sa) & set(sb) or min(order[s] for s in sa) < max(order[s] for s in sb)
            if related:
                assert a1 <= b0 or b1 <= a0, f"{a} [{a0}, {a1}) and {b} [{b0}, {b1}) overlap"
    by = {name: (s0, s1) for name, s0, s1, _ in windows}
    assert by["train-ra-cm3"][0] != by["train-vanilla"][0]  # issue 22: the same minute and lease
    assert by["pack"][0] >= by["retrieve"][1]  # issue 22: pack fired with the retrieve it reads
