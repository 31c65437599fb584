"""Live progress of a stage run: shards and rows done, rows/s, ETA.

A rich bar when stdout is a terminal, a log line every few seconds otherwise; extra sinks (the
Prefect progress artifact) get the same snapshots.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("racm3")
LOG_EVERY_S = 10.0  # without a terminal: one progress line at most this often (and at the end)


@dataclass(frozen=True)
class Snapshot:
    stage: str
    total: int
    done: int
    failed: int
    rows: int
    elapsed: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left, extrapolated from the shards finished so far (None before the first)."""
        n = self.done + self.failed
        return None if n == 0 else self.elapsed / n * (self.total - n)

    @property
    def fraction(self) -> float:
        return (self.done + self.failed) / self.total if self.total else 1.0

    def line(self) -> str:
        eta = "?" if self.eta_s is None else f"{self.eta_s:.0f}s"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"{self.stage}: {self.done + self.failed}/{self.total} shards{failed}, "
                f"{self.rows} rows, {self.rows_per_s:.1f} rows/s, ETA {eta}")


class ProgressSink(Protocol):
    def update(self, snap: Snapshot) -> None: ...

    def close(self, snap: Snapshot) -> None: ...


class LogLines:
    """Periodic log lines (no terminal: CI logs, Prefect workers, redirected output)."""

    def __init__(self, every_s: float = LOG_EVERY_S):
        self.every_s, self.last, self.shown = every_s, 0.0, -1

    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last, self.shown = now, snap.done + snap.failed
            log.info("%s", snap.line())

    def close(self, snap: Snapshot) -> None:
        if snap.done + snap.failed != self.shown:  # the final count, unless just shown
            log.info("%s", snap.line())


class RichBar:
    """A progress bar on the terminal."""

    def __init__(self, stage: str, total: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), transient=False)
        self.task = self.bar.add_task(stage, total=total, info="")
        self.bar.start()

    def update(self, snap: Snapshot) -> None:
        info = f"{snap.rows} rows, {snap.rows_per_s:.1f} rows/s" + (
            f", [red]{snap.failed} failed[/red]" if snap.failed else "")
        self.bar.update(self.task, completed=snap.done + snap.failed, info=info)

    def close(self, snap: Snapshot) -> None:
        self.update(snap)
        self.bar.stop()


def console_sink(stage: str, total: int) -> ProgressSink:
    return RichBar(stage, total) if sys.stdout.isatty() else LogLines()


class Progress:
    """Counts finished shards and fans snapshots out to the sinks (never fails the stage)."""

    def __init__(self, stage: str, total: int, sinks: Iterable[ProgressSink] = (),
                 console: bool = True):
        self.stage, self.total = stage, total
        self.done = self.failed = self.rows = 0
        self.t0 = time.monotonic()
        self.sinks: list[Any] = ([console_sink(stage, total)] if console else []) + list(sinks)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.stage, self.total, self.done, self.failed, self.rows,
                        time.monotonic() - self.t0)

    def shard_done(self, rows: int, failed: bool = False) -> None:
        if failed:
            self.failed += 1
        else:
            self.done, self.rows = self.done + 1, self.rows + rows
        self._each("update")

    def close(self) -> None:
        self._each("close")

    def _each(self, method: str) -> None:
        snap = self.snapshot()
        for sink in self.sinks:
            try:
                getattr(sink, method)(snap)
            except Exception as e:  # noqa: BLE001 - progress display never fails a stage
                log.debug("progress sink %r failed: %s", sink, e)
