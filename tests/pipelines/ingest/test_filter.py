"""The DuckDB filter against hand-computed counts, column variants and bad metadata."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from storage.manifest import list_manifests
from storage.views import connect

# (URL, TEXT, WIDTH, HEIGHT, pwatermark, punsafe) -> expected reason (None = kept)
ROWS = [
    ("http://a/1.jpg", "a cat", 300, 300, 0.1, 0.1, None),
    ("https://a/2.jpg", "a dog", 256, 256, 0.5, 0.5, None),  # thresholds are strict ">"
    ("http://a/3.jpg", "wm", 300, 300, 0.51, 0.1, "watermark"),
    ("http://a/4.jpg", "nsfw", 300, 300, 0.1, 0.9, "unsafe"),
    ("http://a/5.jpg", "small", 255, 300, 0.1, 0.1, "too_small"),
    ("http://a/6.jpg", "short", 300, 100, 0.1, 0.1, "too_small"),
    ("http://a/7.jpg", "", 300, 300, 0.1, 0.1, "empty_caption"),
    ("http://a/8.jpg", None, 300, 300, 0.1, 0.1, "empty_caption"),
    ("ftp://a/9.jpg", "ftp", 300, 300, 0.1, 0.1, "bad_url"),
    ("data:image/png;base64,xx", "inline", 300, 300, 0.1, 0.1, "bad_url"),
    ("http://a/11.jpg", "both bad", 300, 300, 0.9, 0.9, "watermark"),  # first rule wins
    ("http://a/12.jpg", "null scores", 300, 300, None, None, "missing_score"),  # filter.missing_scores
]


def write_metadata(path, cols=("URL", "TEXT", "WIDTH", "HEIGHT", "pwatermark", "punsafe")):
    data = list(zip(*[r[:6] for r in ROWS], strict=True))
    table = pa.table({c: list(v) for c, v in zip(cols, data, strict=True)})
    table = table.append_column("similarity", pa.array([0.3] * len(ROWS)))
    pq.write_table(table, path)


def expected():
    kept = sum(1 for r in ROWS if r[6] is None)
    drops: dict[str, int] = {}
    for r in ROWS:
        if r[6]:
            drops[r[6]] = drops.get(r[6], 0) + 1
    return kept, drops


def run_filter(root, meta, *extra):
    cfgs = load_config("demo", overrides=[f"filter.metadata={meta}", "filter.shard_size=5", *extra])
    return run_stage("filter", root, cfgs)


def test_filter_matches_hand_computed_counts(root, tmp_path):
    meta = tmp_path / "meta.parquet"
    write_metadata(meta)
    report = run_filter(root, meta)
    kept, drops = expected()
    assert report.ok and report.rows_in == len(ROWS) and report.rows_out == kept
    assert dict(report.dropped) == drops
    assert len(report.ran) == 3  # 12 rows in shards of 5
    keys = connect(root).sql("select key from filter order by key").fetchall()
    assert [k for (k,) in keys] == ["000-000000000", "000-000000001"]


def test_missing_scores_keep_keeps_them_and_counts_them(root, tmp_path):
    meta = tmp_path / "meta.parquet"
    write_metadata(meta)
    report = run_filter(root, meta, "filter.missing_scores=keep")
    kept, drops = expected()
    del drops["missing_score"]
    assert report.ok and report.rows_out == kept + 1 and dict(report.dropped) == drops
    assert sum(m["kept_missing_score"] for m in report.metrics.values()) == 1
    row = connect(root).sql("select pwatermark, punsafe from filter where url = 'http://a/12.jpg'")
    assert row.fetchall() == [(None, None)]


def test_lowercase_variant_resolved_by_alias(root, tmp_path):
    meta = tmp_path / "meta.parquet"
    write_metadata(meta, ("url", "caption", "width", "height", "pwatermark", "punsafe"))
    report = run_filter(root, meta)
    assert report.ok and report.rows_out == expected()[0]


def test_laion400m_nsfw_strings(root, tmp_path):
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"URL": ["http://a/1", "http://a/2"], "TEXT": ["x", "y"],
                             "WIDTH": [300, 300], "HEIGHT": [300, 300],
                             "NSFW": ["UNLIKELY", "NSFW"], "similarity": [0.3, 0.3]}), meta)
    report = run_filter(root, meta, "filter.watermark_col=\"\"")
    assert report.ok and report.rows_out == 1 and dict(report.dropped) == {"unsafe": 1}


def test_wrong_columns_list_the_columns_found(root, tmp_path):
    """Found when planning (the driver reports config errors with exit 2), not per shard."""
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"link": ["http://a"], "TEXT": ["x"]}), meta)
    cfgs = load_config("demo", overrides=[f"filter.metadata={meta}"])
    from pipelines.ingest.filter import FilterStage

    with pytest.raises(ConfigError) as e:
        FilterStage().plan(root, cfgs["filter"])
    assert e.value.field == "filter.url_col" and "columns found: link, TEXT" in str(e.value)


def test_missing_metadata_file_is_a_config_error(root, tmp_path):
    cfgs = load_config("demo", overrides=[f"filter.metadata={tmp_path}/nope.parquet"])
    from pipelines.ingest.filter import FilterStage

    with pytest.raises(ConfigError, match="no metadata parquet found"):
        FilterStage().plan(root, cfgs["filter"])


def test_threshold_change_changes_only_affected_shard_contents(root, tmp_path):
    meta = tmp_path / "meta.parquet"
    write_metadata(meta)
    run_filter(root, meta)
    before = {m.shard_id: m.output_digest for m in list_manifests(root, "filter")}
    report = run_filter(root, meta, "filter.max_pwatermark=0.6")  # keeps row 3 (0.51), in shard 0
    after = {m.shard_id: m.output_digest for m in list_manifests(root, "filter")}
    assert len(report.ran) == 3  # every filter shard re-evaluated (cheap SQL) ...
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {"000-00000"}  # ... but only one shard's content changed
