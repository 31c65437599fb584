"""One shard under the run policy: a per-shard deadline (`run.shard_timeout_s`) and retries.

Every executor (in-process threads, Prefect tasks, Beam DoFns) calls `run_with_retries`, so the
policy (retries, their delay, the deadline) is the same on every path.

Why a thread and not a subprocess for the deadline: a shard shares the per-worker resources its
stage loaded once (a CLIP model, a FAISS index), which a subprocess would have to load again or
unpickle for every shard; and Prefect task runs and Beam DoFns already live in threads. On timeout
the shard is stopped in three ways: (1) its commit is refused (a cancel flag checked before the
outputs are renamed into place and before the manifest is written), so a late shard never
becomes "done"; (2) `ShardCancelled` is raised inside its thread (PyThreadState_SetAsyncExc),
which stops pure-Python work at the next bytecode and runs the shard's temp clean-up; (3) the
driver reports it failed at once. A shard blocked inside one long C call (a socket read without
timeout, a huge matmul) keeps its thread until that call returns, then stops; its result is
discarded either way.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import threading
import time
from typing import Any

from pipelines.core.runconfig import RunConfig
from pipelines.core.stage import ShardCancelled, ShardSpec, Stage, execute_shard
from storage.fs import DataRoot
from storage.manifest import Manifest

log = logging.getLogger("racm3")
CANCEL_GRACE_S = 5.0  # how long a timed-out shard gets to clean up its temps


class ShardTimeout(Exception):
    """A shard ran past `run.shard_timeout_s`; not retried (a slow shard stays slow)."""


def attempt(stage: Stage, root: DataRoot, cfg: Any, spec: ShardSpec, resources: Any,
            timeout_s: float = 0.0, owner: str | None = None) -> Manifest:
    """Execute one shard once; with a timeout, in a watched thread that is stopped at the deadline."""
    if timeout_s <= 0:
        return execute_shard(stage, root, cfg, spec, resources, owner=owner)
    cancel = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["manifest"] = execute_shard(stage, root, cfg, spec, resources, cancel=cancel,
                                            owner=owner)
        except BaseException as e:  # noqa: BLE001 - handed back to the waiting thread
            box["error"] = e

    ctx = contextvars.copy_context()  # the Prefect run context (flow-run id in the manifest)
    t = threading.Thread(target=ctx.run, args=(work,), daemon=True,
                         name=f"racm3:{stage.name}/{spec.shard_id}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        cancel.set()
        _raise_in(t, ShardCancelled)
        t.join(CANCEL_GRACE_S)
        still = " (still inside a blocking call; its result will be discarded)" if t.is_alive() else ""
        raise ShardTimeout(f"{stage.name}/{spec.shard_id} ran past run.shard_timeout_s="
                           f"{timeout_s:g}s and was stopped{still}")
    if "error" in box:
        raise box["error"]
    return box["manifest"]


def _raise_in(t: threading.Thread, exc: type[BaseException]) -> None:
    if t.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(exc))


def run_with_retries(stage: Stage, root: DataRoot, cfg: Any, spec: ShardSpec, resources: Any,
                     run: RunConfig, owner: str | None = None) -> tuple[Manifest | None, str | None]:
    """The one retry policy: (manifest, None) on success, (None, error) once `run.retries` extra
    attempts are spent. Waits `run.retry_delay_s` before the first retry, doubling each time."""
    err = ""
    for n in range(run.retries + 1):
        if n:
            time.sleep(run.retry_delay_s * 2 ** (n - 1))
        try:
            return attempt(stage, root, cfg, spec, resources, run.shard_timeout_s, owner), None
        except ShardTimeout as e:
            log.warning("%s", e)
            return None, f"ShardTimeout: {e}"
        except Exception as e:  # noqa: BLE001 - one broken shard never stops the others
            log.warning("%s/%s attempt %d/%d failed: %s", stage.name, spec.shard_id, n + 1,
                        run.retries + 1, e)
            err = f"{type(e).__name__}: {e}"
    return None, err
