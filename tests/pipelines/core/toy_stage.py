"""A tiny in-process stage for driver tests: sleeps, fails or hangs on demand, counts itself."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from pipelines.core.config import StageConfig
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.stage import ShardResult, ShardSpec, Stage


@dataclass(frozen=True)
class ToyConfig(StageConfig):
    shards: int = 4
    sleep_s: float = 0.3
    fail_times: int = 0  # every shard raises on its first `fail_times` attempts
    hang: str = ""  # this shard loops (pure Python) for 60 s unless stopped
    trace: str = ""  # a folder: one line per attempt in <shard>.attempts (seen across processes)

    EXECUTION_FIELDS = frozenset({"sleep_s", "fail_times", "hang", "trace"})


class Counters:
    """Process-wide observations (shards run in this process on every executor under test)."""

    lock = threading.Lock()
    attempts: Counter = Counter()
    running = 0
    max_running = 0
    hang_exit: list[str] = []

    @classmethod
    def reset(cls) -> None:
        cls.attempts, cls.running, cls.max_running, cls.hang_exit = Counter(), 0, 0, []


class ToyStage(Stage):
    name = "toy"
    config = ToyConfig

    def plan(self, root, cfg):
        return [ShardSpec(self.name, f"{i:03d}", ()) for i in range(cfg.shards)]

    def run_shard(self, ctx, resources):
        sid = ctx.spec.shard_id
        with Counters.lock:
            Counters.attempts[sid] += 1
            n = Counters.attempts[sid]
            if ctx.cfg.trace:  # Beam workers may be other processes: count in files
                with open(f"{ctx.cfg.trace}/{sid}.attempts", "a") as f:
                    f.write("x\n")
                n = len(open(f"{ctx.cfg.trace}/{sid}.attempts").readlines())
            Counters.running += 1
            Counters.max_running = max(Counters.max_running, Counters.running)
        try:
            if sid == ctx.cfg.hang:
                self._hang()
            time.sleep(ctx.cfg.sleep_s)
            if n <= ctx.cfg.fail_times:
                raise OSError(f"flaky attempt {n}")
            ctx.write_table(pa.table({"shard": [sid] * 3, "i": [0, 1, 2]}))
            return ShardResult(rows_in=3, rows_out=3)
        finally:
            with Counters.lock:
                Counters.running -= 1

    def _hang(self) -> None:
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 60:  # never looks at ctx.cancel: must be stopped
                time.sleep(0.05)
        finally:
            Counters.hang_exit.append(f"{time.monotonic() - t0:.1f}")


def toy_cfgs(run: RunConfig | None = None, **toy) -> dict:
    return {"run": run or RunConfig(), "beam": BeamConfig(), "toy": ToyConfig(**toy)}


class ToyBeamStage(ToyStage):
    """The same toy, run as a Beam pipeline (DirectRunner, in this process)."""

    name = "toy-beam"
    engine = "beam"
