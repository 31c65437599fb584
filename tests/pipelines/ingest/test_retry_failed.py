"""`racm3 run download --retry-failed`: only rows that failed for a transient reason are fetched again."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from pipelines.demo.paths import www_dir
from pipelines.ingest.downloader import TRANSIENT
from storage.manifest import list_manifests, read_manifest


class Flaky(SimpleHTTPRequestHandler):
    """Serves the demo's files; paths in `server.flaky` answer 503 while `server.down` is set."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        srv = self.server
        with srv.lock:  # type: ignore[attr-defined]
            srv.requests.append(self.path)  # type: ignore[attr-defined]
        if srv.down and self.path in srv.flaky:  # type: ignore[attr-defined]
            self.send_error(503, "busy")
            return
        super().do_GET()


@contextlib.contextmanager
def flaky_server(directory: str, port: int, flaky: set[str]) -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Flaky, directory=directory))
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.flaky, srv.down = threading.Lock(), [], flaky, True  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def rows_of(root) -> dict[str, dict]:
    out = {}
    for m in list_manifests(root, "download"):
        for p in m.outputs:
            out.update({r["key"]: r for r in pq.read_table(root.join(p)).to_pylist()})
    return out


@pytest.fixture
def retry_demo(tmp_path):
    from pipelines.core.registry import load_config as lc
    from storage.fs import DataRoot
    from tests.conftest import SMALL_DEMO, free_port

    overrides = [*SMALL_DEMO, "demo.failing_fraction=0", f"demo.port={free_port()}",
                 "download.retries=0"]
    root = DataRoot(str(tmp_path / "data"))
    assert run_stage("demo", root, lc("demo", overrides=overrides)).ok
    assert run_stage("filter", root, lc("demo", overrides=overrides)).ok
    return root, overrides


def test_retry_fetches_only_transient_failures_and_keeps_successes(retry_demo):
    root, overrides = retry_demo
    cfgs = load_config("demo", overrides=overrides)
    urls, shard_of = {}, {}
    for m in list_manifests(root, "filter"):
        for p in m.outputs:
            for r in pq.read_table(root.join(p)).to_pylist():
                urls[r["key"]], shard_of[r["key"]] = r["url"], m.shard_id
    first_shard = sorted(shard_of.values())[0]
    flaky_keys = sorted(k for k in urls if shard_of[k] == first_shard)[:5]
    flaky = {urlsplit(urls[k]).path for k in flaky_keys}
    with flaky_server(www_dir(root), cfgs["demo"].port, flaky) as srv:
        assert run_stage("download", root, cfgs).ok
        before = rows_of(root)
        assert {k for k, r in before.items() if r["status"] != "success"} == set(flaky_keys)
        assert all("503" in before[k]["error_message"] for k in flaky_keys)
        manifests = {m.shard_id: m for m in list_manifests(root, "download")}

        again = run_stage("download", root, cfgs)  # without retry: everything is done
        assert again.ran == []

        srv.down = False
        srv.requests.clear()
        retry = load_config("demo", overrides=[
            *overrides, f"download.retry_statuses={list(TRANSIENT)!r}".replace("'", '"')])
        report = run_stage("download", root, retry)
        assert report.ok
        images = {p for p in srv.requests if p not in ("/robots.txt", "/.well-known/tdmrep.json")}
        assert images == flaky  # no other image fetched again
    after = rows_of(root)
    assert all(after[k]["status"] == "success" for k in flaky_keys)
    for k, r in before.items():
        if k not in flaky_keys:
            assert after[k] == r  # every success kept byte for byte
    flaky_shards = {shard_of[k] for k in flaky_keys}
    assert sorted(report.ran) == sorted(flaky_shards)  # only shards with failures ran again
    assert len(manifests) > len(flaky_shards)
    for sid, m in manifests.items():
        if sid not in flaky_shards:  # untouched: same bytes, so downstream fingerprints hold
            assert read_manifest(root, "download", sid).output_digest == m.output_digest


def test_retry_statuses_must_be_known():
    with pytest.raises(ConfigError, match="download.retry_statuses"):
        load_config("demo", overrides=['download.retry_statuses=["nope"]'])


def test_retry_failed_flag_is_for_download_only(tmp_path, capsys):
    from flows.cli import main

    rc = main(["run", "filter", "--local", "--retry-failed", "--data-root", str(tmp_path)])
    assert rc == 2 and "--retry-failed" in capsys.readouterr().err
