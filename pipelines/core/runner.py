"""`run_stage`: a registered stage by name, through the one driver, in this process."""

from __future__ import annotations

from typing import Any

from pipelines.core.driver import InProcess, drive
from pipelines.core.registry import get_stage
from pipelines.core.report import StageReport
from storage.fs import DataRoot

__all__ = ["StageReport", "run_stage"]


def run_stage(name: str, root: DataRoot, cfgs: dict[str, Any], force: bool = False) -> StageReport:
    """Run one stage locally: its shards on threads, or its Beam pipeline for Beam stages."""
    return drive(get_stage(name), root, cfgs, InProcess(), force)
