"""A lease that fences: renewal survives storage hiccups, is conditional, expiry is by the store's
clock, a holder's pid is judged only on its own machine, a lost lease stops commits, S3's 409 waits."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time

import pytest

from pipelines.core.runconfig import RunConfig
from pipelines.core.stage import ShardSpec, execute_shard
from storage.fs import DataRoot
from storage.lease import (
    LeaseHeld,
    LeaseLost,
    lease_path,
    machine_id,
    read_lease,
    stage_lease,
    try_acquire,
)
from storage.manifest import read_manifest
from tests.factories import _FixedTable, download_table

pytestmark = pytest.mark.timeout(60)


def plant(root: DataRoot, stage: str, age_s: float = 0.0, **fields) -> None:
    """Another holder's lease, last written `age_s` ago by the store's clock."""
    now = time.time()
    lease = {"stage": stage, "owner": "f00d", "host": "elsewhere", "pid": 1, "acquired_at": now,
             "heartbeat_at": now, "expires_at": now + 600, **fields}
    root.makedirs(root.stage_dir(stage))
    path = lease_path(root, stage)
    root.fs.pipe(path, json.dumps(lease).encode())
    os.utime(path, (now - age_s, now - age_s))


def test_heartbeat_survives_transient_storage_errors(root, monkeypatch):
    real_open = type(root.fs).open
    failing = threading.Event()

    def flaky_open(self, path, *args, **kwargs):
        if failing.is_set() and ".lease.json" in str(path):
            raise OSError(errno.EIO, "injected: store unreachable")
        return real_open(self, path, *args, **kwargs)

    with stage_lease(root, "s", RunConfig(lease_ttl_s=3)) as mine:
        monkeypatch.setattr(type(root.fs), "open", flaky_open)
        failing.set()
        time.sleep(1.8)  # one or two renewals fail
        failing.clear()
        time.sleep(2.0)
        monkeypatch.undo()
        assert read_lease(root, "s").heartbeat_at > mine.heartbeat_at + 1.5  # renewed after
        assert any(t.name == "racm3-lease-s" for t in threading.enumerate())


def test_expiry_is_by_the_stores_clock_not_the_holders(root):
    # the holder's clock runs an hour behind: its expires_at is long past, but it wrote just now
    plant(root, "s", age_s=0.0, expires_at=time.time() - 3600)
    with pytest.raises(LeaseHeld, match="owner f00d"):
        with stage_lease(root, "s", RunConfig()):
            pass
    # its clock runs an hour ahead, but the store saw no write for 10 minutes: expired
    plant(root, "s", age_s=600.0, expires_at=time.time() + 3600)
    with stage_lease(root, "s", RunConfig()) as mine:
        assert mine.owner == root.owner


def test_a_missing_pid_is_dead_only_on_the_holders_own_machine(root):
    p = os.popen("echo $$")  # a pid that has exited
    gone = int(p.read())
    p.close()
    # same host name, other container (boot id / PID namespace): its pid says nothing here
    plant(root, "s", host=socket.gethostname(), pid=gone, machine="other-boot:4026531836")
    with pytest.raises(LeaseHeld):
        with stage_lease(root, "s", RunConfig()):
            pass
    plant(root, "s", host=socket.gethostname(), pid=gone, machine=machine_id())
    with stage_lease(root, "s", RunConfig()) as mine:
        assert mine.machine == machine_id() and ":" in mine.machine


def test_a_late_renewal_never_erases_a_takeover(root):
    a = DataRoot(root.uri, owner="aaaa")
    with stage_lease(a, "s", RunConfig(lease_ttl_s=3)):
        # A's writes stall (the store saw nothing for a minute): B takes the lease over
        past = time.time() - 60
        os.utime(lease_path(root, "s"), (past, past))
        theirs, _ = try_acquire(root, "s", "bbbb", 3.0)
        assert theirs is not None
        time.sleep(2.5)  # A's heartbeat runs at least once more
        assert read_lease(root, "s") == theirs  # B's lease, untouched
    assert read_lease(root, "s") == theirs  # and A's exit did not release B's lease


def test_a_run_that_lost_its_lease_commits_nothing(root):
    spec = ShardSpec("download", "00000", ())
    stage = _FixedTable(download_table(3))
    with stage_lease(root, "download", RunConfig()) as mine:
        execute_shard(stage, root, None, ShardSpec("download", "00001", ()), owner=mine.owner)
        plant(root, "download", owner="beef")  # taken over while we computed
        with pytest.raises(LeaseLost, match="no longer holds the lease"):
            execute_shard(stage, root, None, spec, owner=mine.owner)
    assert read_manifest(root, "download", "00001") is not None
    assert read_manifest(root, "download", "00000") is None
    assert not root.fs.glob(root.join("download", "00000*"))  # no output, no temp left


def test_s3_conditional_conflict_means_taken(monkeypatch):
    mem = DataRoot("memory://racm3-lease-409", owner="aa")

    def conflict(self, path, value, mode="overwrite", **kwargs):
        raise OSError(errno.EBUSY, "ConditionalRequestConflict: concurrent conditional put")

    monkeypatch.setattr(type(mem.fs), "pipe_file", conflict)
    with pytest.raises(LeaseHeld, match="contended"):
        with stage_lease(mem, "s", RunConfig(lease_wait_s=0.6)):
            pass


def test_a_marker_left_by_a_killed_process_does_not_block_a_takeover(root):
    p = os.popen("echo $$")
    gone = int(p.read())
    p.close()
    plant(root, "s", machine=machine_id(), pid=gone)
    marker = {"stage": "s", "owner": "f00d", "host": "h", "pid": gone, "acquired_at": 0.0,
              "heartbeat_at": 0.0, "expires_at": 0.0, "machine": machine_id()}
    root.fs.pipe(lease_path(root, "s") + ".takeover", json.dumps(marker).encode())
    with stage_lease(root, "s", RunConfig(lease_wait_s=3)) as mine:  # killed mid-renewal
        assert mine.owner == root.owner
