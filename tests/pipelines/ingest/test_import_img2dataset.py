"""`download.import_from`: img2dataset's own CLI downloads the demo URLs from the loopback server
(parquet and webdataset output); the download stage fills its shards from that folder with the
rows a racm3 fetch gives, fetches (or marks `missing`) what it lacks, checks hostile imported bytes
like fetched ones, and refuses a folder with foreign columns before writing anything (exit 2)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from storage.manifest import list_manifests, read_manifest
from storage.views import connect
from tests.integration.test_s3 import s3_env  # noqa: F401 - the moto S3 server fixture
from tests.pipelines.ingest.hostile_server import png_bomb

REPO = Path(__file__).resolve().parents[3]
COLS = "key, url, caption, status, jpg, width, height, original_width, original_height, sha256"
LEFT_OUT = 3  # URLs img2dataset is not given: the import lacks them


def run(root, overrides, stage, **kw):
    return run_stage(stage, root, load_config("demo", overrides=overrides), **kw)


def rows(root) -> dict[str, tuple]:
    return {r[1]: r for r in connect(root).sql(f"select {COLS} from download").fetchall()}


def img2dataset(root, tmp_path, fmt: str) -> tuple[Path, list[str]]:
    """img2dataset's CLI over the URL shards' URLs (but the first LEFT_OUT), with racm3's resize."""
    urls = connect(root).sql("select url, caption from filter order by key").to_arrow_table()
    left_out = urls["url"].to_pylist()[:LEFT_OUT]
    listing = tmp_path / "urls.parquet"
    pq.write_table(urls.slice(LEFT_OUT), listing)
    out = tmp_path / f"i2d-{fmt}"
    cmd = [Path(sys.executable).parent / "img2dataset", "--url_list", listing, "--input_format",
           "parquet", "--url_col", "url", "--caption_col", "caption", "--output_format", fmt,
           "--output_folder", out, "--image_size", "256", "--resize_mode", "center_crop",
           "--min_image_size", "256", "--encode_quality", "95", "--processes_count", "1",
           "--thread_count", "8", "--number_sample_per_shard", "25", "--timeout", "10",
           "--distributor", "multiprocessing", "--enable_wandb", "False"]
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=300)
    assert list(out.glob("*_stats.json")) and list(out.glob("*.parquet"))
    assert fmt != "webdataset" or list(out.glob("*.tar"))
    return out, left_out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_imported_rows_equal_a_fetch(served, tmp_path, fmt):
    root, _, overrides = served
    assert run(root, overrides, "filter").ok
    assert run(root, overrides, "download").ok
    fetched = rows(root)
    folder, left_out = img2dataset(root, tmp_path, fmt)
    imp = [*overrides, f"download.import_from={folder}"]

    report = run(root, [*imp, "download.fetch_missing=false"], "download")
    assert report.ok and sorted(report.ran) == sorted(m.shard_id for m in list_manifests(root, "filter"))
    got = rows(root)
    assert got.keys() == fetched.keys()
    for url, row in got.items():
        if url in left_out:
            assert row[3] == "missing" and row[4] is None
        else:
            assert row[:4] == fetched[url][:4], url  # key, url, caption, status
            assert row[4:] == fetched[url][4:], url  # image bytes, sizes, sha256 of the original
    assert {r[3] for r in got.values()} >= {"success", "failed_to_download", "missing"}
    ms = [read_manifest(root, "download", s) for s in report.ran]
    assert sum(m.metrics["missing"] for m in ms) == LEFT_OUT
    assert sum(m.metrics["imported"] for m in ms) == len(fetched) - LEFT_OUT
    assert all(any(i.detail.get("source") == "img2dataset" for i in m.inputs) for m in ms)

    again = run(root, imp, "download")  # fetch_missing = true: only the lacking URLs are fetched
    assert again.ok and rows(root) == fetched
    ms = [read_manifest(root, "download", s) for s in again.ran]
    assert sum(m.metrics["fetched"] for m in ms) == LEFT_OUT
    assert run(root, imp, "download").ran == []  # same import, same shards: nothing re-runs


def make_hostile(folder: Path, fmt: str) -> list[str]:
    """Replace 3 imported successes: a pixel bomb, HTML, a body over the byte cap (a webdataset
    tar gets a symlink member instead of the HTML); returns their URLs."""
    shard = sorted(folder.glob("*.parquet"))[0]
    t = pq.read_table(shard)
    ok = [i for i, s in enumerate(t["status"].to_pylist()) if s == "success"][:3]
    bad = [png_bomb(20_000, 20_000), b"<html>not an image</html>", b"\xff\xd8" + b"x" * 300_000]
    if fmt == "parquet":
        jpg = t["jpg"].to_pylist()
        for i, data in zip(ok, bad, strict=True):
            jpg[i] = data
        col = t.schema.get_field_index("jpg")
        pq.write_table(t.set_column(col, "jpg", pa.array(jpg, pa.binary())), shard)
    else:
        keys = [t["key"][i].as_py() for i in ok]
        tar = shard.with_suffix(".tar")
        with tarfile.open(tar) as src:
            members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src]
        with tarfile.open(tar, "w") as dst:
            for m, data in members:
                if m.name == f"{keys[0]}.jpg" or m.name == f"{keys[2]}.jpg":
                    data = bad[0] if m.name.startswith(keys[0]) else bad[2]
                    m.size = len(data)
                elif m.name == f"{keys[1]}.jpg":  # a link to a host file: never followed
                    m.type, m.linkname, m.size, data = tarfile.SYMTYPE, "/etc/passwd", 0, None
                dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return [t["url"][i].as_py() for i in ok]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_hostile_imported_images_get_the_fetch_checks(served, tmp_path, fmt):
    root, _, overrides = served
    run(root, overrides, "filter")
    folder, _ = img2dataset(root, tmp_path, fmt)
    urls = make_hostile(folder, fmt)
    report = run(root, [*overrides, f"download.import_from={folder}", "download.fetch_missing=false",
                        "download.max_bytes=200000"], "download")
    assert report.ok
    got = connect(root).sql("select url, status, error_message, jpg from download").fetchall()
    status = {u: (s, e, j) for u, s, e, j in got}
    assert [status[u][0] for u in urls] == ["too_many_pixels", "failed_to_resize", "too_large"]
    assert all(status[u][2] is None for u in urls)
    assert sum(s == "success" for s, _, _ in status.values()) > 0  # the others still import


def cli_download(root, overrides, folder) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "flows.cli", "run", "download", "--local", "--data-root",
            root.uri, "--set", f"download.import_from={folder}"]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, cwd=str(REPO), timeout=300)


@pytest.mark.parametrize("table, column", [
    (pa.table({"URL": ["http://a/1.jpg"], "TEXT": ["a cat"]}), "url"),  # LAION metadata, not i2d
    (pa.table({"url": ["http://a/1.jpg"], "key": ["000000000"], "status": ["success"],
               "error_message": pa.array([None], pa.string()), "jpg": ["not bytes"]}), "jpg"),  # wrong type
])
def test_foreign_columns_exit_2_naming_file_and_column(small_demo, tmp_path, table, column):
    root, _, overrides = small_demo
    assert run(root, overrides, "filter").ok
    folder = tmp_path / "not-i2d"
    folder.mkdir()
    pq.write_table(table, folder / "00000.parquet")
    proc = cli_download(root, overrides, folder)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "download.import_from" in proc.stderr and "00000.parquet" in proc.stderr
    assert f"column {column!r}" in proc.stderr
    assert not list_manifests(root, "download")
    assert not root.exists(root.stage_dir("download")) or not root.fs.find(root.stage_dir("download"))


@pytest.mark.slow
def test_import_from_an_object_store(served, tmp_path, s3_env, monkeypatch):  # noqa: F811
    """The img2dataset folder on S3 (moto's server on 127.0.0.1): the same rows as a fetch."""
    import fsspec

    root, _, overrides = served
    run(root, overrides, "filter")
    run(root, overrides, "download")
    fetched = rows(root)
    folder, left_out = img2dataset(root, tmp_path, "webdataset")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(k, s3_env[k])
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_env["FSSPEC_S3_ENDPOINT_URL"]})
    fsspec.filesystem("s3").put(f"{folder}/", "racm3/i2d/", recursive=True)
    report = run(root, [*overrides, "download.import_from=s3://racm3/i2d",
                        "download.fetch_missing=false"], "download")
    assert report.ok
    got = rows(root)
    assert {u: r for u, r in got.items() if u not in left_out} == {
        u: r for u, r in fetched.items() if u not in left_out}
    assert all(got[u][3] == "missing" for u in left_out)
