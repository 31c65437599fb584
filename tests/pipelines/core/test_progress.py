"""Progress: shards and rows done, rows/s and ETA reach every sink; a broken sink is harmless."""

from __future__ import annotations

from pipelines.core.progress import Progress, Snapshot


class Record:
    def __init__(self):
        self.snaps: list[Snapshot] = []
        self.closed = False

    def update(self, snap):
        self.snaps.append(snap)

    def close(self, snap):
        self.closed = True


class Broken:
    def update(self, snap):
        raise RuntimeError("display gone")

    close = update


def test_snapshots_count_shards_rows_and_eta():
    sink = Record()
    p = Progress("s", 4, [Broken(), sink], console=False)
    p.shard_done(10)
    p.shard_done(0, failed=True)
    p.close()
    first, last = sink.snaps
    assert (first.done, first.rows, last.failed, last.done) == (1, 10, 1, 1) and sink.closed
    assert first.eta_s is not None and last.fraction == 0.5
    assert "2/4 shards (1 failed), 10 rows" in last.line() and "rows/s, ETA" in last.line()
    assert Snapshot("s", 3, 0, 0, 0, 1.0).eta_s is None
