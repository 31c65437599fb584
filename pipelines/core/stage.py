"""The stage abstraction: plan shards, skip the done ones, execute the rest under the shard contract.

A stage is a pure function from input shards to one output shard. `execute_shard` is the one
worker function that a test, a Beam DoFn and a Prefect task all call.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from storage.fs import DataRoot, file_digest
from storage.manifest import (
    InputRef,
    Manifest,
    code_version,
    combined_digest,
    fingerprint,
    params_hash,
    read_manifest,
    write_manifest,
)
from storage.shards import read_table, write_table_tmp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: an output shard id and the inputs it is computed from."""

    stage: str
    shard_id: str
    inputs: tuple[InputRef, ...]


@dataclass
class ShardResult:
    """What `run_shard` reports besides the files it wrote."""

    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class ShardCancelled(Exception):
    """Raised inside a shard that ran past its deadline; its outputs are never committed."""


class ShardContext:
    """Handed to `run_shard`: input access and temp outputs that commit only on success."""

    def __init__(self, root: DataRoot, spec: ShardSpec, cfg: Any,
                 cancel: threading.Event | None = None):
        self.root, self.spec, self.cfg = root, spec, cfg
        self.cancel = cancel or threading.Event()  # set when the driver gave up on this shard
        self._pending: dict[str, str] = {}  # final path -> temp path
        self._uploads: dict[str, str] = {}  # temp path on the store -> local staging path

    def check_cancelled(self) -> None:
        """Long shards may call this between batches to stop promptly after a timeout."""
        if self.cancel.is_set():
            raise ShardCancelled(f"{self.spec.stage}/{self.spec.shard_id} was cancelled")

    def input_path(self, i: int = 0) -> str:
        p = self.spec.inputs[i].path
        # a full URL on object stores, so libraries that open paths themselves reach the store
        return p if "://" in p or p.startswith("/") else self.root.url(self.root.join(p))

    def read_input(self, i: int = 0, columns: list[str] | None = None) -> pa.Table:
        return read_table(self.root, self.input_path(i), columns)

    def final_path(self, suffix: str) -> str:
        return self.root.artifact(self.spec.stage, self.spec.shard_id, suffix)

    def output_path(self, suffix: str) -> str:
        """A temp path to write `<shard_id>.<suffix>` to (a file or a folder)."""
        final = self.final_path(suffix)
        self.root.makedirs(posixpath.dirname(final))
        tmp = self.root.tmp_name(final)
        self._pending[final] = tmp
        return tmp

    def local_path(self, suffix: str) -> str:
        """Like `output_path`, but always on local disk, for writers that only know `open`
        (PIL, json, Lightning): on an object-store root it is staged locally and uploaded at commit."""
        tmp = self.output_path(suffix)
        if self.root.is_local:
            return tmp
        local = os.path.join(tempfile.mkdtemp(prefix="racm3-stage-"), posixpath.basename(tmp))
        self._uploads[tmp] = local
        return local

    def _upload(self) -> None:
        for tmp, local in self._uploads.items():
            if os.path.isdir(local):
                self.root.fs.put(local.rstrip("/") + "/", tmp, recursive=True)
            elif os.path.exists(local):
                self.root.fs.put_file(local, tmp)
            shutil.rmtree(os.path.dirname(local), ignore_errors=True)
        self._uploads.clear()

    def write_table(self, table: pa.Table, suffix: str = "parquet") -> str:
        final = self.final_path(suffix)
        self._pending[final] = write_table_tmp(self.root, final, table)
        return final

    def commit(self) -> dict[str, str]:
        """Rename every temp output into place; returns {relative path: digest}."""
        self.check_cancelled()
        self._upload()
        outputs = {}
        for final, tmp in self._pending.items():
            if self.root.fs.exists(final) and self.root.fs.isdir(final):
                self.root.fs.rm(final, recursive=True)
            self.root.commit(tmp, final)
            outputs[self.root.rel(final)] = file_digest(self.root.fs, final)
        return outputs

    def abort(self) -> None:
        for local in self._uploads.values():
            shutil.rmtree(os.path.dirname(local), ignore_errors=True)
        for tmp in self._pending.values():
            if self.root.fs.exists(tmp):
                self.root.fs.rm(tmp, recursive=True)


class Stage:
    """Base class of a stage. Subclasses set the class attributes and implement plan/run_shard."""

    name: ClassVar[str]  # CLI name, Prefect flow `racm3-<name>`, manifest folder
    config: ClassVar[type]  # its config dataclass; its section is derived from `name`
    version: ClassVar[str] = "1"
    # its config section: `name` with "-" -> "_" unless the class body names another (a stage that
    # shares a section, e.g. evaluate-part reads [evaluate]); set by __init_subclass__
    section: ClassVar[str] = ""
    engine: ClassVar[str] = "local"  # "local" (one task per shard) or "beam"
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete stage: derive everything from its declaration
            if "section" not in cls.__dict__:
                cls.section = cls.name.replace("-", "_")
            if "config" in cls.__dict__:  # field names in config errors: `<section>.<field>`
                cls.config.SECTION = cls.section  # type: ignore[attr-defined]

    def plan(self, root: DataRoot, cfg: Any) -> list[ShardSpec]:
        raise NotImplementedError

    def load(self, cfg: Any) -> Any:
        """Per-worker resources (a model); called once per worker, not once per shard."""
        return None

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        raise NotImplementedError

    def params(self, cfg: Any) -> dict[str, Any]:
        return cfg.params() if hasattr(cfg, "params") else {}

    def fingerprint(self, cfg: Any, spec: ShardSpec) -> str:
        return fingerprint(self.version, params_hash(self.params(cfg)), list(spec.inputs))

    def wants_rerun(self, cfg: Any, manifest: Manifest) -> bool:
        """Whether a done shard should run again anyway (download's retry of failed URLs)."""
        return False


@dataclass
class ShardState:
    spec: ShardSpec
    fingerprint: str
    state: str  # "done" | "stale" | "missing"


def shard_states(stage: Stage, root: DataRoot, cfg: Any) -> list[ShardState]:
    out = []
    for spec in stage.plan(root, cfg):
        fp = stage.fingerprint(cfg, spec)
        m = read_manifest(root, stage.name, spec.shard_id)
        if m is None or not all(root.exists(root.join(p)) for p in m.outputs):
            state = "missing"
        else:
            state = "done" if m.fingerprint == fp else "stale"
            if state == "done" and stage.wants_rerun(cfg, m):
                state = "stale"
        out.append(ShardState(spec, fp, state))
    return out


def execute_shard(stage: Stage, root: DataRoot, cfg: Any, spec: ShardSpec,
                  resources: Any = None, flow_run_id: str | None = None,
                  cancel: threading.Event | None = None, owner: str | None = None) -> Manifest:
    """Compute one shard, commit its outputs, then write its manifest (last).

    `cancel` (set by the driver at the shard's deadline) refuses the commit; `owner` is the
    writer id carried in temp names (the stage lease holder's).
    """
    t0 = time.time()
    if owner and owner != root.owner:
        root = dataclasses.replace(root, owner=owner)
    ctx = ShardContext(root, spec, cfg, cancel)
    fence = _fence(root, stage.name, owner)
    fence()  # a run that lost its stage lease starts no more shards
    try:
        result = stage.run_shard(ctx, resources)
        t1 = time.time()
        fence()
        outputs = ctx.commit()
    except BaseException:
        ctx.abort()
        raise
    params = stage.params(cfg)
    m = Manifest(
        stage=stage.name, shard_id=spec.shard_id, stage_version=stage.version,
        params_hash=params_hash(params), fingerprint=stage.fingerprint(cfg, spec),
        code_version=code_version(), inputs=list(spec.inputs), outputs=outputs,
        output_digest=combined_digest(outputs), rows_in=result.rows_in,
        rows_out=result.rows_out, dropped=dict(result.dropped), metrics=result.metrics,
        params=params, timings={"compute_s": round(t1 - t0, 4), "total_s": round(time.time() - t0, 4)},
        flow_run_id=flow_run_id or current_flow_run_id(),
    )
    ctx.check_cancelled()  # a shard past its deadline must not become "done"
    fence()  # nor one of a run that lost its lease meanwhile
    write_manifest(root, m)
    corrupt = root.manifest_path(stage.name, spec.shard_id) + ".corrupt"
    if root.exists(corrupt):  # `racm3 verify` had found it corrupt; recomputed now
        root.fs.rm(corrupt)
    return m


def _fence(root: DataRoot, stage: str, owner: str | None) -> Callable[[], None]:
    """The lease check before a commit: only under a driver, which passes its lease's owner."""
    from storage.lease import check_holder

    return (lambda: check_holder(root, stage, owner)) if owner else (lambda: None)


def current_flow_run_id() -> str | None:
    """The Prefect flow-run id when called under Prefect, else None (no import cost otherwise)."""
    import sys

    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run

        rid = flow_run.id
        return str(rid) if rid else None
    except Exception:  # noqa: BLE001 - the id is best-effort metadata, never a reason to fail
        return None
