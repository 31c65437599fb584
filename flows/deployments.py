"""prefect.yaml, generated from the stage registry: one deployment per stage run, chained in time.

`racm3 deployments --write` rewrites prefect.yaml; `--check` exits 1 when it differs (a test runs
it). Schedules are a timeline by design: every deployment starts when the one before it (an
upstream stage, or a flow holding the same stage leases) is expected to be done, so no two
deployments that share a lease or a dependency ever fire together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.registry import get_stage, plan, section_of

PATH = Path(__file__).resolve().parents[1] / "prefect.yaml"
POOL = {"name": "racm3", "work_queue_name": "default"}
DAY_MIN = 24 * 60
START_MIN = 60  # the timeline starts at 01:00 UTC
# Minutes a stage run is expected to take on the demo preset, with room to spare (default 15).
EXPECTED_MIN: dict[str, int] = {"train": 60, "evaluate-part": 30}
DEFAULT_MIN = 15
WEEKLY = frozenset({"train", "evaluate-part", "evaluate"})  # Sundays; every other stage daily

HEADER = """\
# GENERATED from pipelines/core/registry.py by `racm3 deployments --write`; do not edit by hand
# (`racm3 deployments --check` fails when this file differs from the registry).
# Prefect deployments for racm3: one per stage run and two end-to-end ones, run by a `process`
# work pool worker:
#   prefect server start --host 127.0.0.1 --port 4200
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   prefect work-pool create racm3 --type process
#   prefect deploy --all
#   prefect worker start --pool racm3
# Schedules form one daily timeline (flows/deployments.py): each deployment starts when the one
# before it is expected to be done. Stage schedules are inactive by default (re-running a stage
# skips its done shards, so enabling one is safe); the nightly end-to-end demo is active.
"""


@dataclass(frozen=True)
class Deployment:
    """One prefect.yaml entry and its slot in the timeline."""

    name: str
    entrypoint: str
    parameters: dict[str, Any]
    stages: tuple[str, ...]  # the stage leases it takes
    minutes: int  # how long it is expected to run
    description: str = ""
    weekly: bool = False
    active: bool = False
    start: int = field(default=0, compare=False)  # minute of the day (set by `timeline`)


def expected_min(stage: str) -> int:
    return EXPECTED_MIN.get(stage, DEFAULT_MIN)


def toml_value(v: Any) -> str:
    return json.dumps(v)  # strings, numbers and booleans: JSON and TOML agree


def stage_deployments() -> list[Deployment]:
    """One per run of every registered stage but the demo data (served by `demo-nightly`)."""
    from flows.stages import entrypoint_name

    out = []
    for stage, fields in plan():
        if stage == "demo":
            continue
        params: dict[str, Any] = {"data_root": "data", "preset": "demo", "force": False}
        name = "-".join([stage, *(str(v) for v in fields.values())])
        if fields:
            sec = section_of(stage)
            params["overrides"] = [f"{sec}.{k}={toml_value(v)}" for k, v in fields.items()]
        out.append(Deployment(name, f"flows/stages.py:{entrypoint_name(stage)}", params,
                              (stage,), expected_min(stage), get_stage(stage).description,
                              weekly=stage in WEEKLY))
    return out


def end_to_end() -> list[Deployment]:
    every = [s for s, _ in plan()]
    real = [s for s in every if s != "demo"]
    return [
        Deployment("demo-nightly", "flows/pipeline.py:demo_flow",
                   {"data_root": "data", "seed": 0, "preset": "demo"}, tuple(dict.fromkeys(every)),
                   sum(map(expected_min, every)),
                   "Generated demo data through every stage, nightly.", active=True),
        Deployment("pipeline-nightly", "flows/pipeline.py:pipeline_flow",
                   {"data_root": "data", "preset": "paper"}, tuple(dict.fromkeys(real)),
                   sum(map(expected_min, real)),
                   "Every stage on real LAION metadata (set filter.metadata and the weight paths)."),
    ]


def timeline() -> list[Deployment]:
    """Every deployment with its start minute: each starts when the previous is expected done."""
    out, t = [], START_MIN
    for d in [*end_to_end(), *stage_deployments()]:
        out.append(Deployment(**{**d.__dict__, "start": t}))
        t += d.minutes
    if t > DAY_MIN:
        raise ValueError(f"deployments need {t} minutes, more than a day: lower EXPECTED_MIN")
    return out


def cron(d: Deployment) -> str:
    return f"{d.start % 60} {d.start // 60} * * {'0' if d.weekly else '*'}"


def entry(d: Deployment) -> dict[str, Any]:
    out: dict[str, Any] = {"name": d.name}
    if d.description:
        out["description"] = d.description
    return out | {"entrypoint": d.entrypoint, "parameters": d.parameters, "work_pool": dict(POOL),
                  "schedules": [{"cron": cron(d), "timezone": "UTC", "active": d.active}]}


def render() -> str:
    """prefect.yaml's text, from the registry."""
    doc = {"name": "racm3", "prefect-version": version("prefect"), "build": None, "push": None,
           "deployments": [entry(d) for d in timeline()]}
    return HEADER + "\n" + yaml.safe_dump(doc, sort_keys=False, width=100,
                                          default_flow_style=None)
