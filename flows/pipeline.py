"""The end-to-end flows: `demo` (generated data + local HTTP server) and `pipeline` (real metadata).

Each builds the config once at its entry and hands every stage flow its (typed) step config.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from prefect import flow
from prefect.states import Failed, State

from flows.stages import build_config, run_stage_flow
from pipelines.core.config import ConfigError
from pipelines.core.registry import RUNS, STAGES, plan, section_of
from pipelines.core.report import StageReport
from storage.fs import DataRoot

log = logging.getLogger("racm3")

@dataclass(frozen=True)
class Step:
    """One stage run of the end-to-end flow, with the config it runs under."""

    stage: str
    label: str  # the summary row, e.g. "train (vanilla)"
    cfgs: dict[str, Any]


def steps(cfgs: dict[str, Any], until: str | None = None, include_demo: bool = True) -> list[Step]:
    """The registry's plan (`registry.plan()`: every stage in order, train once per variant) up to
    and including `until`."""
    if until is not None and until not in STAGES:
        raise ConfigError("--until", f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    out = []
    for stage, fields in plan():
        if include_demo or stage != "demo":
            out.append(make_step(cfgs, stage, fields))
        if stage == until and fields == RUNS.get(stage, ({},))[-1]:
            break
    return out


def make_step(cfgs: dict[str, Any], stage: str, fields: dict[str, Any]) -> Step:
    if not fields:
        return Step(stage, stage, cfgs)
    section = section_of(stage)
    label = f"{stage} ({', '.join(str(v) for v in fields.values())})"
    return Step(stage, label, {**cfgs, section: dataclasses.replace(cfgs[section], **fields)})


def run_steps(plan: list[Step], data_root: str, force: bool) -> list[StageReport]:
    reports = []
    for step in plan:
        r = run_stage_flow(step.stage, data_root, step.cfgs, force)
        r.stage = step.label
        reports.append(r)
        if r.failed:
            log.error("%s: %d shards failed; later stages run on what succeeded", step.label,
                      len(r.failed))
    return reports


def outcome(reports: list[StageReport]) -> list[dict] | State:
    """The reports as data; a Failed state carrying them when any shard failed."""
    data = [r.to_dict() for r in reports]
    failed = [r.stage for r in reports if r.failed]
    if failed:
        return Failed(message=f"failed shards in: {', '.join(failed)}", data=data)
    return data


@flow(name="racm3-end-to-end-demo")
def demo_flow(data_root: str = "data", seed: int | None = None, until: str | None = None,
              preset: str = "demo", config_file: str | None = None,
              overrides: list[str] | None = None, force: bool = False,
              config: dict | None = None) -> list[dict] | State:
    """Generate the demo data, serve it on 127.0.0.1, and run every stage up to `until`."""
    from pipelines.demo.paths import www_dir
    from pipelines.demo.server import serve_root_dir

    cfgs = build_config(config, preset, config_file, overrides)
    if seed is not None:
        cfgs = {**cfgs, "demo": dataclasses.replace(cfgs["demo"], seed=seed)}
    plan = steps(cfgs, until)
    reports = run_steps(plan[:1], data_root, force)
    demo = cfgs["demo"]
    root = DataRoot(data_root)
    with serve_root_dir(root, www_dir(root), demo.host, demo.port):
        reports += run_steps(plan[1:], data_root, force)
    return outcome(reports)


@flow(name="racm3-end-to-end")
def pipeline_flow(data_root: str = "data", until: str | None = None, preset: str = "paper",
                  config_file: str | None = None, overrides: list[str] | None = None,
                  force: bool = False, config: dict | None = None) -> list[dict] | State:
    """Every stage on real metadata (filter.metadata), up to `until`."""
    cfgs = build_config(config, preset, config_file, overrides)
    return outcome(run_steps(steps(cfgs, until, include_demo=False), data_root, force))


def reports_of(state: State) -> list[StageReport]:
    """The StageReports an end-to-end flow run ended with, Completed or Failed."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return [StageReport.from_dict(d) for d in data]
