"""One writer per stage: a lease file `<root>/<stage>/.lease.json` that fences its holder's commits.

Taken by the driver before a stage runs and renewed by a heartbeat thread. Creation is atomic:
O_CREAT|O_EXCL on local disk, and fsspec's `pipe_file(mode="create")` elsewhere, which s3fs turns
into a conditional PutObject (`IfNoneMatch="*"`; a concurrent one answers 409, an `OSError(EBUSY)`,
which means "taken"). A filesystem without conditional writes falls back to fsspec's
exists-then-write (not atomic there).

Every change of an existing lease (a renewal, a takeover) happens while holding a second exclusive
file, `.lease.json.takeover`, and only if the lease still reads as it did: so a late renewal never
erases another run's takeover. Expiry is judged by the store's clock alone (the lease file's mtime
against the mtime of that freshly created marker), never by comparing two machines' clocks. A
holder on this very machine (same boot id and PID namespace) whose pid is gone is dead at once.

A holder that loses its lease (taken over after its renewals failed for `run.lease_ttl_s`) is
fenced: `check_holder`, called by the commit path before outputs are renamed into place and before
the manifest is written, raises `LeaseLost`, so its shards never count as done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from storage.fs import DataRoot

log = logging.getLogger("racm3")
POLL_S = 0.5
TAKEOVER_STALE_S = 30.0  # a takeover marker older than this was left by a killed process
# (root, stage, owner) of leases this process's heartbeats gave up on: fenced without any I/O
_LOST: set[tuple[str, str, str]] = set()


class LeaseHeld(Exception):
    """Another live run holds the stage's lease (the CLI exits 2 with this message)."""


class LeaseLost(Exception):
    """This run no longer holds the stage's lease: its shard must not be committed."""


def machine_id() -> str:
    """This machine and PID namespace: pids are comparable only between equal ids (a container
    shares its host name with its neighbours far more often than its boot id and PID namespace)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: the host name is the best there is
        return f"host:{socket.gethostname()}"


@dataclass(frozen=True)
class Lease:
    stage: str
    owner: str
    host: str
    pid: int
    acquired_at: float  # holder's clock: for people reading it, never for expiry
    heartbeat_at: float
    expires_at: float
    machine: str = ""  # machine_id() of the holder ("" in leases from before it was recorded)
    ttl_s: float = 0.0  # not renewed for this long by the store's clock: expired
    token: str = ""  # this acquisition's id
    generation: int = 0  # renewals so far: a renewal writes only over the generation it last wrote

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
    except OSError as e:
        if e.errno == errno.EBUSY:  # S3 409 ConditionalRequestConflict: a concurrent create won
            return False
        raise
    return True


def is_dead(lease: Lease, age_s: float, ttl: float) -> bool:
    """Expired by the store's clock (`age_s`: since its last write), or a gone pid on this machine."""
    if age_s > (lease.ttl_s or ttl):
        return True
    if lease.machine and lease.machine == machine_id() and lease.pid > 0:
        try:
            os.kill(lease.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _new(stage: str, owner: str, ttl: float) -> Lease:
    now = time.time()
    return Lease(stage, owner, socket.gethostname(), os.getpid(), now, now, now + ttl,
                 machine_id(), ttl, uuid.uuid4().hex[:12], 0)


def try_acquire(root: DataRoot, stage: str, owner: str, ttl: float) -> tuple[Lease | None, Lease | None]:
    """(my lease, None) when taken, else (None, the current holder's lease)."""
    path = lease_path(root, stage)
    mine = _new(stage, owner, ttl)
    if create_exclusive(root, path, mine.to_bytes()):
        return mine, None
    held = read_lease(root, stage)
    if held is None:  # released between our create and read: try again next poll
        return None, None
    with exclusive(root, stage, mine) as marker:
        if marker is None or read_lease(root, stage) != held:
            return None, held
        if not is_dead(held, _mtime(root, marker) - _mtime(root, path), ttl):
            return None, held
        with contextlib.suppress(FileNotFoundError):
            root.fs.rm(path)
        log.warning("%s: took over the lease of a dead or expired run: %s", stage, held.holder())
        return (mine, None) if create_exclusive(root, path, mine.to_bytes()) else (None, None)


@contextlib.contextmanager
def exclusive(root: DataRoot, stage: str, who: Lease) -> Iterator[str | None]:
    """The takeover marker's path while this call holds it, else None (someone else does)."""
    marker = lease_path(root, stage) + ".takeover"
    if not create_exclusive(root, marker, who.to_bytes()):
        with contextlib.suppress(FileNotFoundError):
            if _abandoned(root, marker):
                root.fs.rm(marker)
        yield None
        return
    try:
        yield marker
    finally:
        with contextlib.suppress(FileNotFoundError):
            root.fs.rm(marker)


def _abandoned(root: DataRoot, marker: str) -> bool:
    """A marker left by a killed process: its writer's pid is gone from this machine, or it is
    older than TAKEOVER_STALE_S (a renewal or takeover holds it for milliseconds)."""
    try:
        with root.fs.open(marker, "rb") as f:
            who = Lease(**json.loads(f.read()))
        if who.machine == machine_id() and who.pid > 0 and who.pid != os.getpid():
            os.kill(who.pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, TypeError, PermissionError):
        pass
    return time.time() - _mtime(root, marker) > TAKEOVER_STALE_S


def _mtime(root: DataRoot, path: str) -> float:
    """Modification time by the store's clock."""
    root.fs.invalidate_cache(path)
    info: dict[str, Any] = root.fs.info(path)
    m = info.get("mtime") or info.get("LastModified") or info.get("created") or time.time()
    return m.timestamp() if hasattr(m, "timestamp") else float(m)


def renew(root: DataRoot, lease: Lease) -> Lease | None:
    """The renewed lease, None if it is no longer ours; OSError (try again) if the store failed
    or another renewal/takeover held the marker."""
    with exclusive(root, lease.stage, lease) as marker:
        if marker is None:
            raise OSError(errno.EBUSY, "lease marker busy")
        if read_lease(root, lease.stage) != lease:  # taken over: never write over it
            return None
        now = time.time()
        new = dataclasses.replace(lease, heartbeat_at=now, expires_at=now + lease.ttl_s,
                                  generation=lease.generation + 1)
        root.write_bytes_atomic(lease_path(root, lease.stage), new.to_bytes())
        return new


def check_holder(root: DataRoot, stage: str, owner: str) -> None:
    """Raise LeaseLost unless `owner` still holds the stage's lease (the commit path's fence)."""
    if (root.uri, stage, owner) in _LOST:
        raise LeaseLost(f"{stage}: this run ({owner}) lost its lease; the shard is not committed")
    current = read_lease(root, stage)
    if current is None or current.owner != owner:
        raise LeaseLost(f"{stage}: this run ({owner}) no longer holds the lease (now "
                        f"{current.holder() if current else 'nobody'}); the shard is not committed")


class Heartbeat(threading.Thread):
    """Renews the lease every ttl/3; a storage error is retried every second until a whole ttl
    has passed without a renewal. A lease lost either way fences this run's commits."""

    def __init__(self, root: DataRoot, lease: Lease, ttl: float):
        super().__init__(daemon=True, name=f"racm3-lease-{lease.stage}")
        self.root, self.lease, self.ttl = root, lease, ttl
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        last_ok, wait = time.monotonic(), self.ttl / 3
        while not self.stopped.wait(wait):
            try:
                renewed = renew(self.root, self.lease)
            except OSError as e:
                if time.monotonic() - last_ok > self.ttl:
                    return self._lose(f"no renewal for {self.ttl:g}s ({e})")
                log.warning("%s: lease renewal failed (%s); retrying", self.lease.stage, e)
                wait = min(1.0, self.ttl / 6)
                continue
            if renewed is None:
                current = read_lease(self.root, self.lease.stage)
                return self._lose(f"taken over by {current.holder() if current else 'nobody'}")
            self.lease, last_ok, wait = renewed, time.monotonic(), self.ttl / 3

    def _lose(self, why: str) -> None:
        self.lost = True
        _LOST.add((self.root.uri, self.lease.stage, self.lease.owner))
        log.error("%s: lease lost: %s; no further shard is committed by this run",
                  self.lease.stage, why)


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
    _LOST.discard((root.uri, stage, lease.owner))
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
