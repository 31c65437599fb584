"""The end-to-end flows: `demo` (generated data + local HTTP server) and `pipeline` (real metadata)."""

from __future__ import annotations

import logging

from prefect import flow

from flows.stages import STAGE_FLOWS
from pipelines.core.registry import STAGES, load_config
from pipelines.core.runner import StageReport
from storage.fs import DataRoot

log = logging.getLogger("racm3")

# (stage, extra overrides) in pipeline order; stages not registered yet are left out.
PLAN: list[tuple[str, tuple[str, ...]]] = [
    ("demo", ()), ("filter", ()), ("download", ()), ("fit-clip", ()), ("fit-vqgan", ()),
    ("embed", ()), ("tokenize", ()), ("index", ()), ("retrieval-eval", ()), ("retrieve", ()),
    ("pack", ()),
    ("train", ("train.variant=\"ra-cm3\"",)), ("train", ("train.variant=\"vanilla\"",)),
    ("evaluate", ()),
]


def steps(until: str | None = None, include_demo: bool = True) -> list[tuple[str, tuple[str, ...]]]:
    """The plan up to and including `until`, skipping stages that are not registered."""
    names = [s for s, _ in PLAN]
    if until is not None and until not in names:
        raise ValueError(f"--until: unknown stage {until!r}; stages: {', '.join(dict.fromkeys(names))}")
    out = []
    for stage, extra in PLAN:
        if stage in STAGES and (include_demo or stage != "demo"):
            out.append((stage, extra))
        if stage == until:
            break
    return out


def run_steps(plan: list[tuple[str, tuple[str, ...]]], data_root: str, preset: str,
              config_file: str | None, overrides: list[str], force: bool) -> list[StageReport]:
    reports = []
    for stage, extra in plan:
        d = STAGE_FLOWS[stage](data_root=data_root, preset=preset, config_file=config_file,
                               overrides=[*overrides, *extra], force=force)
        r = StageReport.from_dict(d)
        if extra:  # e.g. train run twice: label the row by its variant
            r.stage = f"{stage} ({extra[0].split('=', 1)[1].strip(chr(34))})"
        reports.append(r)
        if r.failed:
            log.error("%s: %d shards failed; later stages run on what succeeded", stage, len(r.failed))
    return reports


@flow(name="racm3-end-to-end-demo")
def demo_flow(data_root: str = "data", seed: int = 0, until: str | None = None,
              preset: str = "demo", config_file: str | None = None,
              overrides: list[str] | None = None, force: bool = False) -> list[dict]:
    """Generate the demo data, serve it on 127.0.0.1, and run every stage up to `until`."""
    from pipelines.demo.paths import www_dir
    from pipelines.demo.server import serve_directory

    overrides = [f"demo.seed={seed}", *(overrides or [])]
    cfgs = load_config(preset, config_file, overrides)
    plan = steps(until)
    reports = run_steps(plan[:1], data_root, preset, config_file, overrides, force)
    demo = cfgs["demo"]
    with serve_directory(www_dir(DataRoot(data_root)), demo.host, demo.port):
        reports += run_steps(plan[1:], data_root, preset, config_file, overrides, force)
    return [r.to_dict() for r in reports]


@flow(name="racm3-end-to-end")
def pipeline_flow(data_root: str = "data", until: str | None = None, preset: str = "paper",
                  config_file: str | None = None, overrides: list[str] | None = None,
                  force: bool = False) -> list[dict]:
    """Every stage on real metadata (filter.metadata), up to `until`."""
    plan = steps(until, include_demo=False)
    return [r.to_dict() for r in run_steps(plan, data_root, preset, config_file,
                                           list(overrides or []), force)]
