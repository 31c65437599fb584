"""Every fetch failure is retryable or final by design: a short body is retried, DNS has a deadline."""

from __future__ import annotations

import socket
import threading
import time

import img2dataset.downloader  # noqa: F401 - imported by fetch(); loaded here, not on the clock
import pytest

from pipelines.ingest.downloader import RETRYABLE, DownloadLimits, ShardDownloader
from pipelines.ingest.fetch import FetchLimits, Refused, fetch
from pipelines.ingest.images import ImageResizer
from pipelines.ingest.netpolicy import NetPolicy
from tests.pipelines.ingest.hostile_server import hostile_servers, jpeg

pytestmark = pytest.mark.timeout(60)
FILES = {"/ok.jpg": jpeg()}
LOCAL = NetPolicy(("127.0.0.1",))


def row(url: str) -> dict:
    return {"key": "0", "url": url, "caption": "c", "pwatermark": 0.1, "punsafe": 0.1,
            "similarity": 0.3}


def test_a_body_shorter_than_its_content_length_is_truncated_and_retried():
    with hostile_servers(FILES) as (base, _):
        with pytest.raises(Refused) as e:
            fetch(f"{base}/truncated", LOCAL, FetchLimits(), time.monotonic() + 5)
        assert e.value.status == "truncated" and "Content-Length" in str(e.value)
        assert "truncated" in RETRYABLE
        dl = ShardDownloader(LOCAL, FetchLimits(), ImageResizer(min_image_size=0),
                             DownloadLimits(url_timeout_s=5, retries=2), threads=1)
        from tests.pipelines.ingest.hostile_server import Hostile

        seen = len(Hostile.hosts_seen)
        out = dl.one(row(f"{base}/truncated"), time.monotonic() + 30)
        dl.close()
    assert out["status"] == "truncated" and out["jpg"] is None
    assert len(Hostile.hosts_seen) - seen == 3  # the first try and both retries reached the server


@pytest.fixture
def slow_dns(monkeypatch):
    """`slow.test` takes 5 s to resolve (a resolver that does not answer); the rest is real."""
    real = socket.getaddrinfo
    release = threading.Event()

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "slow.test":
            release.wait(5)
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    release.set()  # the abandoned lookup ends with the test: no thread is left waiting


def test_dns_resolution_has_the_url_deadline(slow_dns):
    t0 = time.monotonic()
    with pytest.raises(Refused) as e:
        fetch("http://slow.test/ok.jpg", NetPolicy(("slow.test",)), FetchLimits(), t0 + 0.5)
    assert time.monotonic() - t0 < 2, "the URL deadline must bound name resolution"
    assert e.value.status == "timeout" and "dns" in str(e.value)
