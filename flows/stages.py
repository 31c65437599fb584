"""One Prefect flow per stage: plan shards, run the stale ones as tasks, publish counts and assets."""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.core.registry import STAGES, get_stage, load_config
from pipelines.core.runner import StageReport, collect, pending
from pipelines.core.stage import ShardSpec, Stage, execute_shard
from storage.fs import DataRoot
from storage.manifest import Manifest, list_manifests

log = logging.getLogger("racm3")


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="{stage_name}/{spec.shard_id}")
def shard_task(stage_name: str, root: DataRoot, cfg: Any, spec: ShardSpec,
               resources: Any = None) -> Manifest:
    """One shard under the shard contract; Prefect retries a broken shard."""
    return execute_shard(get_stage(stage_name), root, cfg, spec, resources)


@task(cache_policy=NO_CACHE, task_run_name="{stage.name}/beam")
def beam_task(stage: Stage, root: DataRoot, cfg: Any, specs: list[ShardSpec],
              beam_cfg: Any) -> dict[str, str]:
    """A Beam stage's stale shards as one Beam pipeline (the runner decides where they run)."""
    from pipelines.core.beam import run_on_beam

    return run_on_beam(stage, root, cfg, specs, beam_cfg)


def run_stage_in_flow(stage_name: str, root: DataRoot, cfgs: dict[str, Any],
                      force: bool = False) -> StageReport:
    """The body every stage flow shares (called inside a flow run)."""
    t0 = time.time()
    stage = get_stage(stage_name)
    cfg = cfgs[stage.section]
    root.clean_tmp(stage_name)
    todo, done = pending(stage, root, cfg, force)
    report = StageReport(stage_name, skipped=done)
    log.info("%s: %d shards to run, %d already done", stage_name, len(todo), len(done))
    if todo and stage.engine == "beam":
        report.failed.update(beam_task(stage, root, cfg, todo, cfgs["beam"]))
        collect(report, stage, root, [s for s in todo if s.shard_id not in report.failed])
    elif todo:
        resources = stage.load(cfg)
        futures = [shard_task.submit(stage_name, root, cfg, s, resources) for s in todo]
        for spec, fut in zip(todo, futures, strict=True):
            try:
                report.add(fut.result())
            except Exception as e:  # noqa: BLE001 - reported in the summary, the rest goes on
                report.failed[spec.shard_id] = f"{type(e).__name__}: {e}"
            log.info("%s: %d/%d shards", stage_name, len(report.ran) + len(report.failed), len(todo))
    report.seconds = time.time() - t0
    publish(report, root, stage_name)
    return report


def publish(report: StageReport, root: DataRoot, stage_name: str) -> None:
    """Prefect artifact (counts table) and asset materialization for the stage's output."""
    rows = [{"shards run": len(report.ran), "shards skipped": len(report.skipped),
             "shards failed": len(report.failed), "rows in": report.rows_in,
             "rows out": report.rows_out, **{f"dropped: {k}": v for k, v in report.dropped.items()}}]
    key = "racm3-" + "".join(c if c.isalnum() else "-" for c in stage_name.lower())
    create_table_artifact(table=rows, key=key, description=f"racm3 `{stage_name}` shard and row counts")
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


def _make_flow(stage_name: str):
    flow_name = "racm3-demo-data" if stage_name == "demo" else f"racm3-{stage_name}"

    @flow(name=flow_name, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
    def stage_flow(data_root: str = "data", preset: str = "demo", config_file: str | None = None,
                   overrides: list[str] | None = None, force: bool = False) -> dict:
        cfgs = load_config(preset, config_file, overrides)
        return run_stage_in_flow(stage_name, DataRoot(data_root), cfgs, force).to_dict()

    return stage_flow


STAGE_FLOWS = {name: _make_flow(name) for name in STAGES}

# Module-level names for prefect.yaml entrypoints (flows/stages.py:filter_flow).
demo_data_flow = STAGE_FLOWS["demo"]
filter_flow = STAGE_FLOWS["filter"]
download_flow = STAGE_FLOWS["download"]
fit_clip_flow = STAGE_FLOWS["fit-clip"]
fit_vqgan_flow = STAGE_FLOWS["fit-vqgan"]
embed_flow = STAGE_FLOWS["embed"]
tokenize_flow = STAGE_FLOWS["tokenize"]
index_flow = STAGE_FLOWS["index"]
retrieval_eval_flow = STAGE_FLOWS["retrieval-eval"]
retrieve_flow = STAGE_FLOWS["retrieve"]
pack_flow = STAGE_FLOWS["pack"]
train_flow = STAGE_FLOWS["train"]
evaluate_flow = STAGE_FLOWS["evaluate"]
