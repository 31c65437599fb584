"""Polite fetching against a loopback server: robots.txt, TDMRep, 429 + Retry-After, per-host cap."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from pipelines.ingest.download import DownloadConfig, build_downloader
from pipelines.ingest.polite import retry_after_s, tdm_reserved
from tests.pipelines.ingest.hostile_server import jpeg

IMG = jpeg(300, 300)


class Polite(BaseHTTPRequestHandler):
    """Serves images; robots.txt, tdmrep.json and throttling come from `server.conf`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        # the request stops counting as open before its answer starts: a client can only let
        # another thread in after reading the answer, so the peak is never inflated by the gap
        # between the client's release and this handler's return
        self._leave()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        srv = self.server
        conf = srv.conf  # type: ignore[attr-defined]
        with srv.lock:  # type: ignore[attr-defined]
            srv.requests.append(self.path)  # type: ignore[attr-defined]
            srv.open += 1  # type: ignore[attr-defined]
            srv.peak = max(srv.peak, srv.open)  # type: ignore[attr-defined]
        self._counted = True
        try:
            self._route(conf)
        finally:
            self._leave()

    def _leave(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            with self.server.lock:  # type: ignore[attr-defined]
                self.server.open -= 1  # type: ignore[attr-defined]

    def _route(self, conf: dict) -> None:
        p = self.path
        if p == "/robots.txt":
            if "robots_loop" in conf:
                return self._send(302, headers={"Location": "/robots.txt"})
            if "robots_status" in conf:
                return self._send(conf["robots_status"])
            if "robots" not in conf:
                return self._send(404)
            return self._send(200, conf["robots"])
        if p == "/.well-known/tdmrep.json":
            return self._send(200, conf["tdmrep"]) if "tdmrep" in conf else self._send(404)
        if p.startswith("/throttled/"):
            with self.server.lock:  # type: ignore[attr-defined]
                n = conf.setdefault("hits", {}).get(p, 0)
                conf["hits"][p] = n + 1
            if n < conf.get("throttle_times", 1):
                return self._send(429, b"slow down", {"Retry-After": str(conf.get("retry_after", 1))})
        if p.startswith("/tdmheader/"):
            return self._send(200, IMG, {"Content-Type": "image/jpeg", "tdm-reservation": "1"})
        time.sleep(conf.get("delay_s", 0))
        self._send(200, IMG, {"Content-Type": "image/jpeg"})


@contextlib.contextmanager
def polite_server(conf: dict) -> Iterator[tuple[str, ThreadingHTTPServer]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Polite)
    srv.daemon_threads = True
    srv.conf, srv.lock, srv.requests, srv.open, srv.peak = conf, threading.Lock(), [], 0, 0  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    finally:
        srv.shutdown()
        srv.server_close()


def download(base: str, paths: list[str], **cfg) -> list[dict]:
    conf = DownloadConfig(allow_hosts=("127.0.0.1",), min_image_size=0, image_size=64, **cfg)
    dl = build_downloader(conf)
    try:
        urls = pa.table({"key": [f"000-{i:09d}" for i in range(len(paths))],
                         "url": [base + p for p in paths], "caption": ["c"] * len(paths),
                         "pwatermark": [0.0] * len(paths), "punsafe": [0.0] * len(paths),
                         "similarity": [0.3] * len(paths)})
        return dl.download(urls).to_pylist()
    finally:
        dl.close()


def test_robots_txt_disallow_is_its_own_status_and_fetched_once_per_host():
    robots = b"User-agent: racm3\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n"
    with polite_server({"robots": robots}) as (base, srv):
        rows = download(base, ["/ok/1.jpg", "/private/2.jpg", "/ok/3.jpg", "/private/4.jpg"])
        assert [r["status"] for r in rows] == ["success", "opted_out_robots", "success",
                                               "opted_out_robots"]
        assert "robots.txt disallows /private/2.jpg" in rows[1]["error_message"]
        assert srv.requests.count("/robots.txt") == 1  # cached per host
        assert "/private/2.jpg" not in srv.requests  # never requested


def test_robots_for_another_agent_do_not_apply_and_can_be_ignored():
    with polite_server({"robots": b"User-agent: *\nDisallow: /\n"}) as (base, srv):
        rows = download(base, ["/a.jpg"], honour_robots=False)
        assert rows[0]["status"] == "success" and "/robots.txt" not in srv.requests
        rows = download(base, ["/a.jpg"], user_agent_token="racm3")
        assert rows[0]["status"] == "opted_out_robots"  # '*' applies to racm3 too


@pytest.mark.parametrize("status, expect", [(404, "success"), (503, "robots_unreachable")])
def test_missing_robots_allows_and_unreachable_robots_disallows(status, expect):
    """RFC 9309: 4xx means no rules; 5xx means assume complete disallow (a retryable status)."""
    with polite_server({"robots_status": status}) as (base, _):
        assert download(base, ["/a.jpg"])[0]["status"] == expect


def test_huge_robots_and_redirect_loops_are_bounded():
    big = b"User-agent: racm3\nDisallow: /private/\n" + b"# padding\n" * 1_000_000  # ~10 MB
    with polite_server({"robots": big}) as (base, _):
        t0 = time.monotonic()
        rows = download(base, ["/private/a.jpg", "/b.jpg"])
        assert [r["status"] for r in rows] == ["opted_out_robots", "success"]
        assert time.monotonic() - t0 < 15
    with polite_server({"robots_loop": True}) as (base, srv):
        rows = download(base, ["/a.jpg"])
        assert rows[0]["status"] == "success"  # RFC 9309: too many redirects = unavailable
        assert srv.requests.count("/robots.txt") <= 6


def test_tdmrep_file_and_header_opt_out():
    tdm = b'[{"location": "/reserved/*", "tdm-reservation": 1}, {"location": "/*", "tdm-reservation": 0}]'
    with polite_server({"tdmrep": tdm}) as (base, _):
        rows = download(base, ["/reserved/a.jpg", "/open/b.jpg", "/tdmheader/c.jpg"])
        assert [r["status"] for r in rows] == ["opted_out_tdm", "success", "opted_out_tdm"]
        rows = download(base, ["/reserved/a.jpg", "/tdmheader/c.jpg"], honour_tdmrep=False)
        assert [r["status"] for r in rows] == ["success", "success"]


def test_429_with_retry_after_is_waited_out_then_fetched():
    with polite_server({"throttle_times": 1, "retry_after": 1}) as (base, srv):
        t0 = time.monotonic()
        rows = download(base, ["/throttled/a.jpg"], retries=1)
        assert rows[0]["status"] == "success"
        assert time.monotonic() - t0 >= 0.9  # waited the server's Retry-After
        assert srv.requests.count("/throttled/a.jpg") == 2


def test_429_past_the_deadline_is_rate_limited_not_a_hang():
    with polite_server({"throttle_times": 5, "retry_after": 3600}) as (base, _):
        t0 = time.monotonic()
        rows = download(base, ["/throttled/a.jpg"], retries=2, url_timeout_s=2.0)
        assert rows[0]["status"] == "rate_limited"
        assert time.monotonic() - t0 < 10


def test_per_host_cap_holds_across_threads():
    with polite_server({"delay_s": 0.2}) as (base, srv):
        rows = download(base, [f"/img/{i}.jpg" for i in range(24)], threads=16,
                        per_host_connections=3)
        assert all(r["status"] == "success" for r in rows)
        assert srv.peak <= 3, srv.peak
    with polite_server({"delay_s": 0.2}) as (base, srv):
        download(base, [f"/img/{i}.jpg" for i in range(24)], threads=16, per_host_connections=16)
        assert srv.peak > 3  # the cap, not the server, was what held it


def test_retry_after_forms():
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 10) == pytest.approx(10)
    assert retry_after_s("soon") is None and retry_after_s(None) is None


def test_tdm_rules_first_match_wins():
    rules = [{"location": "/a/*", "tdm-reservation": 0}, {"location": "/*", "tdm-reservation": 1}]
    assert tdm_reserved(rules, "/a/x.jpg") is None
    assert tdm_reserved(rules, "/b/x.jpg") == rules[1]
