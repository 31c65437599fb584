"""One Prefect flow per stage: build the config once, run the stage through the one driver with
shards as Prefect tasks, publish counts, failures, progress and assets; Failed if a shard failed."""

from __future__ import annotations

import functools
import logging
from typing import Any

from prefect import Flow, flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.core.driver import Job, OnResult, RunShard, drive
from pipelines.core.progress import Snapshot
from pipelines.core.registry import STAGES, config_from_dict, get_stage, load_config
from pipelines.core.report import StageReport
from pipelines.core.stage import ShardSpec, Stage
from storage.fs import DataRoot
from storage.manifest import Manifest, list_manifests

log = logging.getLogger("racm3")


class ShardFailed(Exception):
    """A shard that failed under the run policy (its retries spent): the task run is Failed."""


@task(cache_policy=NO_CACHE, task_run_name="{stage}/{spec.shard_id}")
def shard_task(stage: str, spec: ShardSpec, run_shard: RunShard) -> Manifest:
    """One shard under the one run policy (`run_shard` retries it; Prefect does not)."""
    m, err = run_shard(spec)
    if m is None:
        raise ShardFailed(err or "failed")
    return m


class PrefectTasks:
    """The driver's executor inside a flow run: one Prefect task per shard on a thread pool of
    `run.shard_concurrency` workers."""

    def map(self, job: Job, run_shard: RunShard, specs: list[ShardSpec],
            on_result: OnResult) -> None:
        runner: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=job.run.shard_concurrency)
        with runner:
            futures: dict[Any, ShardSpec] = {runner.submit(shard_task, {"stage": job.stage.name, "spec": spec,
                                                  "run_shard": run_shard}): spec for spec in specs}
            for fut in as_completed(list(futures)):
                try:
                    on_result(futures[fut], fut.result(), None)
                except Exception as e:  # noqa: BLE001 - reported in the summary, the rest goes on
                    on_result(futures[fut], None, str(e) if isinstance(e, ShardFailed)
                              else f"{type(e).__name__}: {e}")


class ProgressArtifact:
    """A Prefect progress artifact that advances as shards finish."""

    def __init__(self, stage_name: str):
        from prefect.artifacts import create_progress_artifact

        self.id: Any = create_progress_artifact(0.0, key=artifact_key(stage_name) + "-progress",
                                           description=f"racm3 `{stage_name}`: shards done")

    def update(self, snap: Snapshot) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.id, round(100 * snap.fraction, 1), description=snap.line())

    def close(self, snap: Snapshot) -> None:
        self.update(snap)


def artifact_key(stage_name: str) -> str:
    return "racm3-" + "".join(c if c.isalnum() else "-" for c in stage_name.lower())


def publish(report: StageReport, root: DataRoot, stage_name: str) -> None:
    """Prefect artifacts (counts table, failed shards with errors) and the stage's asset."""
    rows = [{"shards run": len(report.ran), "shards skipped": len(report.skipped),
             "shards failed": len(report.failed), "rows in": report.rows_in,
             "rows out": report.rows_out, **{f"dropped: {k}": v for k, v in report.dropped.items()}}]
    key = artifact_key(stage_name)
    create_table_artifact(table=rows, key=key, description=f"racm3 `{stage_name}` shard and row counts")
    if report.failed:
        lines = [f"# racm3 `{stage_name}`: {len(report.failed)} failed shards", "",
                 "| shard | error |", "|---|---|"]
        lines += [f"| {sid} | {err.replace('|', '/')[:500]} |" for sid, err in report.failed.items()]
        create_markdown_artifact("\n".join(lines), key=key + "-failures",
                                 description=f"racm3 `{stage_name}` failed shards and their errors")
    record_asset(root, stage_name)
    if stage_name == "evaluate" and not report.failed:
        publish_evaluation(root)


def publish_evaluation(root: DataRoot) -> None:
    """The metrics table (one row per model) and a link to the HTML report."""
    import json

    from prefect.artifacts import create_link_artifact

    from pipelines.evaluation.evaluate import report_path

    path = root.artifact("evaluate", "main", "metrics.json")
    if not root.exists(path):
        return
    with root.fs.open(path, "r") as f:
        models = json.load(f)["models"]
    table = [{"model": name, **{k: v for k, v in m.items() if not k.endswith("_n")}}
             for name, m in models.items()]
    create_table_artifact(table=table, key="racm3-metrics",
                          description="RA-CM3 vs vanilla CM3 vs retrieval baseline (held-out split)")
    url = root.url(report_path(root))
    create_link_artifact(link=url if "://" in url else "file://" + url, key="racm3-report",
                         link_text="racm3 evaluation report (HTML)")


def asset_key(root: DataRoot, stage: str) -> str:
    url = root.url(root.stage_dir(stage))
    return url if "://" in url else "file://" + url


def record_asset(root: DataRoot, stage_name: str) -> None:
    """Declare the stage's folder as a Prefect asset, with its upstream stages as dependencies."""
    try:
        from prefect.assets import Asset, materialize
    except ImportError:  # older Prefect: manifests remain the lineage of record
        return
    upstream = sorted({i.stage for m in list_manifests(root, stage_name) for i in m.inputs if i.stage})
    deps: list[Asset | str] = [asset_key(root, u) for u in upstream]

    def _noop() -> None:
        return None

    materialize(asset_key(root, stage_name), asset_deps=deps,
                name=f"asset:{stage_name}", cache_policy=NO_CACHE)(_noop)()


def build_config(config: dict | None, preset: str, config_file: str | None,
                 overrides: list[str] | None) -> dict[str, Any]:
    """A flow's config: the caller's built config (as data) when given, else from the preset
    (deployments and the UI pass preset/overrides)."""
    return config_from_dict(config) if config is not None else load_config(preset, config_file,
                                                                           overrides)


def run_in_flow(stage: Stage, root: DataRoot, cfgs: dict[str, Any],
                force: bool = False) -> dict | State:
    """The body of every stage flow: the report as a dict, or a Failed state carrying it."""
    report = drive(stage, root, cfgs, PrefectTasks(), force, sinks=[ProgressArtifact(stage.name)])
    publish(report, root, stage.name)
    if report.failed:
        ids = ", ".join(list(report.failed)[:10])
        return Failed(message=f"{stage.name}: {len(report.failed)} shards failed ({ids})",
                      data=report.to_dict())
    return report.to_dict()


def flow_name(stage_name: str) -> str:
    return f"racm3-{stage_name}"


def entrypoint_name(stage_name: str) -> str:
    """The module attribute prefect.yaml's entrypoint names: `<name>_stage_flow`, "-" spelt "_"."""
    return stage_name.replace("-", "_") + "_stage_flow"


@functools.cache
def stage_flow(stage_name: str) -> Flow:
    """The Prefect flow `racm3-<name>` of a registered stage, built on first use."""
    get_stage(stage_name)  # an unknown stage is a ConfigError naming the stages

    @flow(name=flow_name(stage_name))
    def run_one_stage(data_root: str = "data", preset: str = "demo", config_file: str | None = None,
                      overrides: list[str] | None = None, force: bool = False,
                      config: dict | None = None) -> dict | State:
        cfgs = build_config(config, preset, config_file, overrides)
        return run_in_flow(get_stage(stage_name), DataRoot(data_root), cfgs, force)

    return run_one_stage


def __getattr__(attr: str) -> Flow:
    """`flows.stages.<name>_stage_flow` for every registered stage (prefect.yaml's entrypoints),
    so registering a stage needs no edit here."""
    for name in STAGES:
        if entrypoint_name(name) == attr:
            return stage_flow(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def report_of(state: State) -> StageReport:
    """The StageReport a stage flow run ended with, Completed or Failed."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return StageReport.from_dict(data)


def run_stage_flow(stage_name: str, data_root: str, cfgs: dict[str, Any],
                   force: bool = False) -> StageReport:
    """Run a stage's flow with an already built config (what the CLI and end-to-end flows do)."""
    from pipelines.core.registry import config_to_dict

    state = stage_flow(stage_name)(data_root=data_root, config=config_to_dict(cfgs),
                                    force=force, return_state=True)
    return report_of(state)  # type: ignore[arg-type]  # return_state=True: a State

