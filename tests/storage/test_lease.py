"""One writer per stage: the lease is exclusive, names its holder, is taken over from dead or
expired holders, and temp clean-up spares a live writer's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.core.runconfig import RunConfig
from storage.fs import DataRoot
from storage.lease import LeaseHeld, lease_path, read_lease, stage_lease

BIN = Path(sys.executable).parent


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def plant(root: DataRoot, stage: str, **fields) -> None:
    now = time.time()
    lease = {"stage": stage, "owner": "f00d", "host": "elsewhere", "pid": 1,
             "acquired_at": now, "heartbeat_at": now, "expires_at": now + 600, **fields}
    root.makedirs(root.stage_dir(stage))
    root.fs.pipe(lease_path(root, stage), json.dumps(lease).encode())


def test_second_writer_is_refused_with_the_holder_named(root):
    other = DataRoot(root.uri, owner="beef")
    with stage_lease(root, "s", RunConfig()) as mine:
        assert read_lease(root, "s") == mine
        with pytest.raises(LeaseHeld, match=f"owner {root.owner} \\(pid {os.getpid()}"):
            with stage_lease(other, "s", RunConfig(lease_wait_s=0.6)):
                pass
    assert read_lease(root, "s") is None  # released
    with stage_lease(other, "s", RunConfig()) as theirs:
        assert theirs.owner == "beef"


@pytest.mark.parametrize("stale", ["expired",  # not renewed for a ttl by the store's clock
                                   {"host": os.uname().nodename, "pid": -1},
                                   "dead-pid"])
def test_dead_or_expired_holder_is_taken_over(root, stale):
    from storage.lease import machine_id

    fields = ({"machine": machine_id(), "pid": dead_pid()} if stale == "dead-pid"
              else {} if stale == "expired" else stale)
    plant(root, "s", **fields)
    if stale == "expired":
        past = time.time() - 600
        os.utime(lease_path(root, "s"), (past, past))
    if stale == {"host": os.uname().nodename, "pid": -1}:  # pid unknown, not expired: held
        with pytest.raises(LeaseHeld, match="owner f00d"):
            with stage_lease(root, "s", RunConfig()):
                pass
        return
    with stage_lease(root, "s", RunConfig()) as mine:
        assert mine.owner == root.owner


def test_heartbeat_renews_the_lease(root):
    with stage_lease(root, "s", RunConfig(lease_ttl_s=3)) as mine:
        time.sleep(2.5)
        assert read_lease(root, "s").expires_at > mine.expires_at


def test_clean_tmp_spares_live_writers(root):
    root.makedirs(root.stage_dir("s"))
    live = DataRoot(root.uri, owner="a1").tmp_name(root.join("s", "x.parquet"))
    dead = DataRoot(root.uri, owner="d0").tmp_name(root.join("s", "y.parquet"))
    old = root.join("s", "z.parquet.tmp-0123456789ab")  # from before temps carried an owner
    for p in (live, dead, old):
        root.fs.pipe(p, b"half")
    assert root.clean_tmp("s", keep={"a1"}) == 2
    assert root.exists(live) and not root.exists(dead) and not root.exists(old)


@pytest.mark.slow
def test_two_concurrent_cli_runs_do_each_shard_once(small_demo, tmp_path):
    root, _, overrides = small_demo
    sets = [a for o in [*overrides, "run.lease_wait_s=300"] for a in ("--set", o)]
    cmd = [str(BIN / "racm3"), "run", "filter", "--local", "--data-root", root.uri, *sets]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    n = len(root.glob("filter/*.manifest.json"))
    ran = sorted(int(cells(o)[1]) for o, _ in outs)
    skipped = sorted(int(cells(o)[2]) for o, _ in outs)
    assert n > 1 and ran == [0, n] and skipped == [0, n]  # every shard computed exactly once


def test_second_cli_run_exits_2_naming_the_holder(small_demo, capsys):
    from flows.cli import main

    root, _, overrides = small_demo
    sets = [a for o in overrides for a in ("--set", o)]
    with stage_lease(DataRoot(root.uri, owner="cafe"), "filter", RunConfig()):
        code = main(["run", "filter", "--local", "--data-root", root.uri, *sets])
    err = capsys.readouterr().err
    assert code == 2 and "being run by owner cafe" in err and root.glob("filter/*.manifest.json") == []


def cells(out: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.strip("│ ").startswith("filter"))
    return [c.strip() for c in line.split("│") if c.strip()]


def test_object_store_path_uses_conditional_create():
    """Non-local roots go through fsspec `pipe_file(mode="create")` (s3fs: IfNoneMatch="*")."""
    mem = DataRoot("memory://racm3-lease-test", owner="aa")
    other = DataRoot("memory://racm3-lease-test", owner="bb")
    with stage_lease(mem, "s", RunConfig()):
        with pytest.raises(LeaseHeld, match="owner aa"):
            with stage_lease(other, "s", RunConfig()):
                pass
    with stage_lease(other, "s", RunConfig()) as lease:
        assert lease.owner == "bb"
