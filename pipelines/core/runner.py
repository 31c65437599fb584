"""`run_stage`: THE way to run a registered stage in code, by name, through the one driver.

`racm3 run --local`, the Prefect stage flows (with Prefect tasks as the executor), the end-to-end
flows, ablations and tests all end in `drive`; library code and notebooks call `run_stage`.
"""

from __future__ import annotations

from typing import Any

from pipelines.core.driver import Executor, drive
from pipelines.core.registry import get_stage
from pipelines.core.report import StageReport
from storage.fs import DataRoot

__all__ = ["StageReport", "run_stage"]


def run_stage(name: str, root: DataRoot, cfgs: dict[str, Any], force: bool = False,
              executor: Executor | None = None) -> StageReport:
    """Run one stage: its pending shards on threads of this process (or `executor`), or its Beam
    pipeline for a Beam stage; done shards are skipped unless `force`."""
    return drive(get_stage(name), root, cfgs, executor, force)
