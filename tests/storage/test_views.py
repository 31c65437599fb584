"""DuckDB views: one per stage over committed shards only, plus manifests."""

from __future__ import annotations

import pyarrow as pa

from storage.shards import write_table
from storage.views import connect, views
from tests.factories import make_download_shard


def test_views_see_committed_shards_only(root):
    make_download_shard(root, "00000", 3, failures=1)
    make_download_shard(root, "00001", 2, start=10)
    # a shard renamed into place whose manifest was never written (killed run) is invisible
    write_table(root, root.join("download", "00002.parquet"),
                make_table_like(root))
    con = connect(root)
    assert set(views(root)) == {"manifests", "download"}
    assert con.sql("select count(*) from download").fetchall()[0][0] == 6
    status = dict(con.sql("select status, count(*) from download group by 1").fetchall())
    assert status == {"success": 5, "failed_to_download": 1}
    m = con.sql("select stage, shard_id, rows_out from manifests order by shard_id").fetchall()
    assert m == [("download", "00000", 4), ("download", "00001", 2)]


def make_table_like(root) -> pa.Table:
    from tests.factories import download_table

    return download_table(5, start=100)
