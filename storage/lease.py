"""One writer per stage: a lease file `<root>/<stage>/.lease.json` (owner, host, pid, expiry).

Taken by the driver before a stage runs and renewed by a heartbeat thread. Creation is atomic:
O_CREAT|O_EXCL on local disk, and fsspec's `pipe_file(mode="create")` elsewhere, which s3fs turns
into a conditional PutObject (`IfNoneMatch="*"`); a filesystem without conditional writes falls
back to fsspec's exists-then-write (not atomic; two runs starting in the same instant could both
win there). A lease whose holder is dead (same host, pid gone) or that was not renewed within
`run.lease_ttl_s` is taken over; the takeover itself is serialised by a second exclusive file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from storage.fs import DataRoot

log = logging.getLogger("racm3")
POLL_S = 0.5
TAKEOVER_STALE_S = 30.0  # a takeover marker older than this was left by a killed process


class LeaseHeld(Exception):
    """Another live run holds the stage's lease (the CLI exits 2 with this message)."""


@dataclass(frozen=True)
class Lease:
    stage: str
    owner: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def holder(self) -> str:
        left = self.expires_at - time.time()
        return (f"owner {self.owner} (pid {self.pid} on {self.host}, heartbeat "
                f"{time.time() - self.heartbeat_at:.0f}s ago, expires in {left:.0f}s)")


def lease_path(root: DataRoot, stage: str) -> str:
    return root.join(stage, ".lease.json")


def read_lease(root: DataRoot, stage: str) -> Lease | None:
    try:
        with root.fs.open(lease_path(root, stage), "rb") as f:
            return Lease(**json.loads(f.read()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # half-written by a killed process: treat as expired
        return Lease(stage, "?", "?", -1, 0.0, 0.0, 0.0)


def create_exclusive(root: DataRoot, path: str, data: bytes) -> bool:
    """Create `path` with `data` unless it exists; True if this call created it."""
    root.makedirs(path.rsplit("/", 1)[0])
    try:
        if root.is_local:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            root.fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def is_dead(lease: Lease, now: float) -> bool:
    if lease.expires_at < now:
        return True
    if lease.host == socket.gethostname() and lease.pid > 0:
        try:
            os.kill(lease.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _new(stage: str, owner: str, ttl: float) -> Lease:
    now = time.time()
    return Lease(stage, owner, socket.gethostname(), os.getpid(), now, now, now + ttl)


def try_acquire(root: DataRoot, stage: str, owner: str, ttl: float) -> tuple[Lease | None, Lease | None]:
    """(my lease, None) when taken, else (None, the current holder's lease)."""
    path = lease_path(root, stage)
    mine = _new(stage, owner, ttl)
    if create_exclusive(root, path, mine.to_bytes()):
        return mine, None
    held = read_lease(root, stage)
    if held is None:  # released between our create and read: try again next poll
        return None, None
    if not is_dead(held, time.time()):
        return None, held
    return (mine, None) if _take_over(root, stage, held, mine) else (None, held)


def _take_over(root: DataRoot, stage: str, stale: Lease, mine: Lease) -> bool:
    """Replace a dead holder's lease; only one contender passes the takeover marker."""
    marker = lease_path(root, stage) + ".takeover"
    if not create_exclusive(root, marker, mine.to_bytes()):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - _mtime(root, marker) > TAKEOVER_STALE_S:
                root.fs.rm(marker)
        return False
    try:
        if read_lease(root, stage) != stale:  # someone else took it over and renewed first
            return False
        with contextlib.suppress(FileNotFoundError):
            root.fs.rm(lease_path(root, stage))
        log.warning("%s: took over the lease of a dead or expired run: %s", stage, stale.holder())
        return create_exclusive(root, lease_path(root, stage), mine.to_bytes())
    finally:
        with contextlib.suppress(FileNotFoundError):
            root.fs.rm(marker)


def _mtime(root: DataRoot, path: str) -> float:
    info: dict[str, Any] = root.fs.info(path)
    m = info.get("mtime") or info.get("LastModified") or info.get("created") or time.time()
    return m.timestamp() if hasattr(m, "timestamp") else float(m)


class Heartbeat(threading.Thread):
    """Renews the lease every ttl/3 until stopped; notices (and logs) a lease lost to a takeover."""

    def __init__(self, root: DataRoot, lease: Lease, ttl: float):
        super().__init__(daemon=True, name=f"racm3-lease-{lease.stage}")
        self.root, self.lease, self.ttl = root, lease, ttl
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.ttl / 3):
            current = read_lease(self.root, self.lease.stage)
            if current is None or current.owner != self.lease.owner:
                self.lost = True
                log.error("%s: lease lost to %s", self.lease.stage,
                          current.holder() if current else "nobody")
                return
            now = time.time()
            self.lease = Lease(**{**asdict(self.lease), "heartbeat_at": now,
                                  "expires_at": now + self.ttl})
            self.root.write_bytes_atomic(lease_path(self.root, self.lease.stage),
                                         self.lease.to_bytes())


@contextlib.contextmanager
def stage_lease(root: DataRoot, stage: str, run: Any) -> Iterator[Lease]:
    """Hold the stage's lease for the block; wait up to `run.lease_wait_s`, else LeaseHeld."""
    ttl, deadline = float(run.lease_ttl_s), time.monotonic() + float(run.lease_wait_s)
    while True:
        lease, held = try_acquire(root, stage, root.owner, ttl)
        if lease is not None:
            break
        if time.monotonic() >= deadline:
            raise LeaseHeld(f"stage {stage!r} on {root.uri} is being run by {held.holder()}"
                            if held else f"stage {stage!r}: lease contended")
        time.sleep(POLL_S)
    beat = Heartbeat(root, lease, ttl)
    beat.start()
    try:
        yield lease
    finally:
        beat.stopped.set()
        beat.join()
        current = read_lease(root, stage)
        if current is not None and current.owner == lease.owner and not beat.lost:
            with contextlib.suppress(FileNotFoundError):
                root.fs.rm(lease_path(root, stage))
