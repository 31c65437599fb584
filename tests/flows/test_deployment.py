"""prefect.yaml: every deployment's entrypoint resolves to a Prefect flow with valid parameters."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parents[2]


def deployments() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_every_entrypoint_is_a_flow_and_parameters_match():
    names = set()
    for d in deployments():
        path, attr = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, attr)
        assert isinstance(flow, Flow), d["entrypoint"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(d.get("parameters", {})) <= accepted, d["name"]
        assert d["work_pool"]["name"] == "racm3" and d["schedules"][0]["cron"]
        names.add(d["name"])
    from pipelines.core.registry import STAGES

    # one deployment per stage (train twice: one per variant), plus the end-to-end ones
    assert {n for n in STAGES if n != "demo"} <= {n.split("-ra-cm3")[0].split("-vanilla")[0]
                                                  for n in names}
    assert {"demo-nightly", "pipeline-nightly"} <= names
