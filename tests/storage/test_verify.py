"""`racm3 verify`: a truncated shard is found, marked stale, shown by status, skipped by
inspect with a warning, and recomputed (byte-identical) by the next run."""

from __future__ import annotations

import pytest

from flows.cli import main
from storage.verify import corrupt_shards


def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def filtered(small_demo, capsys):
    root, _, overrides = small_demo
    sets = [a for o in overrides for a in ("--set", o)]
    code, _, err = cli(capsys, "run", "filter", "--local", "--data-root", root.uri, *sets)
    assert code == 0, err
    return root, sets


def status_cells(out: str, stage: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.strip("│ ").startswith(stage))
    return [c.strip() for c in line.split("│") if c.strip()]


def test_truncated_shard_found_marked_and_recomputed(filtered, capsys, caplog):
    root, sets = filtered
    shard = root.join("filter", "000-00001.parquet")
    good = root.fs.cat(shard)
    with root.fs.open(shard, "wb") as f:
        f.write(good[: len(good) // 2])

    code, out, _ = cli(capsys, "inspect", "--data-root", root.uri, "--format", "csv",
                       "select count(*) as n from filter")
    assert code == 0 and int(out.splitlines()[1]) > 0  # the other shard still answers
    assert "skipping unreadable shard filter/000-00001.parquet" in caplog.text

    code, out, _ = cli(capsys, "verify", "--data-root", root.uri)
    assert code == 1 and "CORRUPT filter/000-00001: filter/000-00001.parquet: digest mismatch" in out
    assert corrupt_shards(root, "filter") == ["000-00001"]
    code, out, _ = cli(capsys, "status", "--data-root", root.uri, *sets)
    cells = status_cells(out, "filter")
    assert cells[4:6] == ["1", "1"]  # missing 1, corrupt 1

    code, out, _ = cli(capsys, "run", "filter", "--local", "--data-root", root.uri, *sets)
    shards = len(root.glob("filter/*.manifest.json"))
    assert code == 0 and status_cells(out, "filter")[1:3] == ["1", str(shards - 1)]  # only it ran
    assert root.fs.cat(shard) == good and corrupt_shards(root, "filter") == []
    code, out, _ = cli(capsys, "verify", "filter", "--data-root", root.uri)
    assert code == 0 and "0 corrupt" in out
