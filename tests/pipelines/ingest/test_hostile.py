"""Hostile input, end to end through filter and download: every row ends with its status or reason.

The metadata and the servers are this test's own (127.0.0.1 and 127.0.0.2). Private, link-local
and other addresses are reached only through host names that a patched resolver maps to them;
socket connects are wrapped so the test fails if one to an address outside 127/8 is attempted.
"""

from __future__ import annotations

import ipaddress
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.registry import get_stage, load_config
from pipelines.core.runner import run_stage
from pipelines.core.stage import execute_shard
from pipelines.ingest.netpolicy import NetPolicy, address_problem
from storage.fs import DataRoot
from tests.pipelines.ingest.hostile_server import hostile_servers, jpeg, png_bomb

pytestmark = pytest.mark.timeout(90)

FAKE_DNS = {  # test host name -> the address it "resolves" to
    "private.test": "10.1.2.3",
    "home.test": "192.168.1.20",
    "meta.test": "169.254.169.254",
    "v6local.test": "fe80::1",
    "mapped.test": "::ffff:10.0.0.1",
    "cgnat.test": "100.64.0.1",
    "multicast.test": "224.0.0.1",
    "zero.test": "0.0.0.0",
    "public.test": "93.184.216.34",  # allowed by policy: the connect is attempted, and stopped here
    "tls.test": "127.0.0.1",  # the HTTPS test server, by name (allow-listed there)
}

# (URL or path on the first server, expected download status, words the error must contain)
DOWNLOADS = [
    ("/ok.jpg", "success", ""),
    ("/chain/3", "success", ""),  # three redirects, each re-checked, then the image
    ("/chain/9", "too_many_redirects", "more than 5"),
    ("/redirect/private", "refused_address", "private: 10.1.2.3"),
    ("/redirect/metadata", "refused_address", "link_local: 169.254.169.254"),
    ("/redirect/second-host", "refused_address", "loopback: 127.0.0.2"),
    ("/redirect/file", "refused_url", "scheme"),
    ("/drip", "timeout", "timeout"),
    ("/drip-headers", "timeout", "timeout"),
    ("/endless", "too_large", "body over"),
    ("/oversize", "too_large", "Content-Length"),
    ("/oversize-unannounced", "too_large", "body over"),
    ("/bomb.png", "too_many_pixels", ""),  # 20000 x 20000 (PIL's own bomb limit)
    ("/bomb-8k.png", "too_many_pixels", "8000x8000"),  # under PIL's limit, over ours
    ("/opted-out", "opted_out", "noai"),
    ("/opted-out-racm3", "opted_out", "racm3: noindex"),
    ("/opted-out-other-bot", "success", ""),  # a directive for another user agent
    ("/missing.jpg", "failed_to_download", "HTTP Error 404"),
    ("/html", "failed_to_resize", "not an image"),
    ("/small.jpg", "failed_to_resize", "image too small"),
    ("http://private.test/a.jpg", "refused_address", "private: 10.1.2.3"),
    ("http://home.test/a.jpg", "refused_address", "private: 192.168.1.20"),
    ("http://meta.test/latest/meta-data/", "refused_address", "link_local"),
    ("http://v6local.test/a.jpg", "refused_address", "link_local: fe80::1"),
    ("http://mapped.test/a.jpg", "refused_address", "private"),
    ("http://cgnat.test/a.jpg", "refused_address", "not_global"),
    ("http://multicast.test/a.jpg", "refused_address", "multicast"),
    ("http://zero.test/a.jpg", "refused_address", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "refused_address", "link_local"),
    ("http://[::1]:9/a.jpg", "refused_address", "loopback"),
    ("SECOND/ok.jpg", "refused_address", "loopback: 127.0.0.2"),  # a host not on the allow-list
    ("http://no-such-host.invalid/a.jpg", "failed_to_download", "dns"),
    ("http://public.test/a.jpg", "failed_to_download", "connect"),  # public: tried (and stopped)
]

# Metadata rows the filter must drop, with the reason (typed columns, two row groups of 4).
NUMERIC_DROPS = [
    (float("nan"), 0.1, "fine", "missing_score"),
    (0.1, float("nan"), "fine", "missing_score"),
    (None, 0.1, "fine", "missing_score"),
    (0.9, 0.1, "fine", "watermark"),
    (float("nan"), 0.1, "fine", "missing_score"),  # NaN beside a high value: same answer
    (0.1, 0.1, b"bad \xff\xfe utf-8", "bad_utf8"),
    (0.1, 0.1, "", "empty_caption"),
    (0.1, 0.9, "fine", "unsafe"),
]
# A second file whose numbers are stored as strings: cast, and failures counted as drops.
STRING_ROWS = [  # (WIDTH, punsafe, pwatermark, expected reason)
    ("abc", "0.1", "0.1", "bad_width"),
    ("300", "0.9", "0.1", "unsafe"),  # "0.9" is 0.9, not 0.0
    ("300", "NSFW", "0.1", "unsafe"),
    ("300", "0.1", "", "bad_pwatermark"),
    ("300", "zero", "0.1", "bad_punsafe"),
    ("300.0", "0.1", "0.1", None),  # kept: 300.0 is a width
]


@pytest.fixture
def guarded_network(monkeypatch):
    """Fake DNS for the test names; connects outside 127/8 are recorded and never made."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    attempted: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host in FAKE_DNS:
            ip = FAKE_DNS[host]
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            addr = (ip, port, 0, 0) if fam == socket.AF_INET6 else (ip, port)
            return [(fam, socket.SOCK_STREAM, 6, "", addr)]
        if isinstance(host, str) and host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, port, *args, **kwargs)

    def connect(self, address):
        ip = address[0] if isinstance(address, tuple) else str(address)
        if ipaddress.ip_address(ip.split("%")[0]) not in ipaddress.ip_network("127.0.0.0/8"):
            attempted.append(ip)
            raise ConnectionRefusedError(f"test guard: no connection to {ip}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempted


def write_metadata(d: Path, base: str, second: str) -> None:
    urls = [u.replace("SECOND", second) if u.startswith("SECOND") else
            (u if "://" in u else base + u) for u, *_ in DOWNLOADS]
    n = len(urls)
    captions = [f"row {i}".encode() for i in range(n)] + [c if isinstance(c, bytes) else c.encode()
                                                          for *_, c, _ in NUMERIC_DROPS]
    a = pa.table({
        "URL": urls + [f"{base}/ok.jpg"] * len(NUMERIC_DROPS),
        "TEXT": pa.array(captions, pa.binary()).view(pa.string()),  # invalid UTF-8 as a string
        "WIDTH": [300] * (n + len(NUMERIC_DROPS)), "HEIGHT": [300] * (n + len(NUMERIC_DROPS)),
        "pwatermark": [0.1] * n + [r[0] for r in NUMERIC_DROPS],
        "punsafe": [0.1] * n + [r[1] for r in NUMERIC_DROPS],
        "similarity": [0.3] * (n + len(NUMERIC_DROPS)),
    })
    pq.write_table(a, d / "a.parquet", row_group_size=4)
    b = pa.table({"URL": [f"{base}/ok.jpg"] * len(STRING_ROWS), "TEXT": ["s"] * len(STRING_ROWS),
                  "WIDTH": [r[0] for r in STRING_ROWS], "HEIGHT": ["300"] * len(STRING_ROWS),
                  "pwatermark": [r[2] for r in STRING_ROWS], "punsafe": [r[1] for r in STRING_ROWS],
                  "similarity": ["0.3"] * len(STRING_ROWS)})
    pq.write_table(b, d / "b.parquet")


FILES = {"/ok.jpg": jpeg(), "/small.jpg": jpeg(64, 64), "/bomb.png": png_bomb(20000, 20000),
         "/bomb-8k.png": png_bomb(8000, 8000)}


def test_every_hostile_row_ends_with_its_status(tmp_path, guarded_network):
    root = DataRoot(str(tmp_path / "data"))
    (tmp_path / "meta").mkdir()
    with hostile_servers(FILES) as (base, second):
        write_metadata(tmp_path / "meta", base, second)
        port = base.rsplit(":", 1)[1]
        cfgs = load_config("demo", overrides=[
            f"filter.metadata={tmp_path}/meta/*.parquet", "filter.shard_size=16",
            f'download.allow_hosts=["127.0.0.1:{port}"]', "download.url_timeout_s=2",
            "download.max_bytes=2000000", "download.threads=16", "download.retries=0"])
        report = run_stage("filter", root, cfgs)
        assert report.ok
        expected_drops: dict[str, int] = {}
        for *_, reason in NUMERIC_DROPS + [(*r[:3], r[3]) for r in STRING_ROWS]:
            if reason:
                expected_drops[reason] = expected_drops.get(reason, 0) + 1
        assert dict(report.dropped) == expected_drops
        assert report.rows_out == len(DOWNLOADS) + 1

        stage = get_stage("download")
        resources = stage.load(cfgs["download"])
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.monotonic()
        manifests = [execute_shard(stage, root, cfgs["download"], spec, resources)
                     for spec in stage.plan(root, cfgs["download"])]  # what Beam's DoFn calls
        elapsed = time.monotonic() - t0
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
        resources.close()
    assert rss_growth < 300, f"peak RSS grew {rss_growth:.0f} MB: was the 400M-pixel bomb decoded?"
    assert all(m.rows_in == m.rows_out for m in manifests)  # no shard failed, no row lost
    rows = pa.concat_tables([pq.read_table(root.join(p)) for m in manifests for p in m.outputs])
    by_url = {r["url"]: r for r in rows.to_pylist()}
    for url, status, words in DOWNLOADS:
        full = url.replace("SECOND", second) if url.startswith("SECOND") else (
            url if "://" in url else base + url)
        row = by_url[full]
        assert row["status"] == status, (url, row["status"], row["error_message"])
        assert words in (row["error_message"] or ""), (url, row["error_message"])
        if status == "success":
            assert row["jpg"][:2] == b"\xff\xd8" and (row["width"], row["height"]) == (256, 256)
        else:
            assert row["jpg"] is None
    assert elapsed < 12, f"drips must end by their 2 s deadline; the shards took {elapsed:.1f}s"
    assert set(guarded_network) == {"93.184.216.34"}  # only the public address was ever tried


def test_shard_deadline_turns_the_rest_into_deadline_rows(tmp_path, guarded_network):
    from pipelines.ingest.download import build_downloader

    with hostile_servers(FILES) as (base, _):
        cfgs = load_config("demo", overrides=[
            'download.allow_hosts=["127.0.0.1"]', "download.url_timeout_s=2",
            "download.shard_deadline_s=3", "download.threads=1", "download.retries=0"])
        n = 6
        urls = pa.table({"key": [f"{i:03d}" for i in range(n)], "url": [f"{base}/drip"] * n,
                         "caption": ["c"] * n, "pwatermark": [0.1] * n, "punsafe": [0.1] * n,
                         "similarity": [0.3] * n}).cast(pa.schema([
                             ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                             ("pwatermark", pa.float32()), ("punsafe", pa.float32()),
                             ("similarity", pa.float32())]))
        dl = build_downloader(cfgs["download"])
        t0 = time.monotonic()
        table = dl.download(urls)
        elapsed = time.monotonic() - t0
        dl.close()
    statuses = table["status"].to_pylist()
    assert statuses[0] == "timeout" and statuses[1:] == ["deadline"] * (n - 1), statuses
    assert elapsed < 5, f"the shard deadline is 3 s; it took {elapsed:.1f}s"


def test_allow_list_is_the_one_way_through(tmp_path, guarded_network):
    """127.0.0.2 is refused until allow-listed; then the same redirect is followed."""
    from pipelines.ingest.fetch import FetchLimits, Refused, fetch

    with hostile_servers(FILES) as (base, second):
        deadline = time.monotonic() + 5
        closed = NetPolicy(("127.0.0.1",))
        with pytest.raises(Refused) as e:
            fetch(f"{base}/redirect/second-host", closed, FetchLimits(), deadline)
        assert e.value.status == "refused_address" and "after 1 redirect" in str(e.value)
        opened = NetPolicy(("127.0.0.1", second.removeprefix("http://")))
        assert fetch(f"{base}/redirect/second-host", opened, FetchLimits(), deadline) == FILES["/ok.jpg"]
        other_port = NetPolicy(("127.0.0.1:1",))  # the host with another port is not allowed
        with pytest.raises(Refused, match="loopback"):
            fetch(f"{base}/ok.jpg", other_port, FetchLimits(), deadline)
    assert guarded_network == []


def test_https_connects_by_ip_with_the_name_in_sni_and_host(tmp_path, monkeypatch, guarded_network):
    """TLS goes to the checked IP, verifies the certificate for the URL's name (SNI), and the
    URL deadline holds inside TLS reads too."""
    import ssl

    from pipelines.ingest import fetch as fetch_mod
    from pipelines.ingest.fetch import FetchLimits, Refused, fetch
    from tests.pipelines.ingest.hostile_server import Hostile, self_signed, tls_server

    cert, key = self_signed(str(tmp_path), "tls.test")
    policy = NetPolicy(("tls.test",))
    with tls_server(FILES, cert, key) as (port, sni):
        url = f"https://tls.test:{port}"
        with pytest.raises(Refused, match="CERTIFICATE_VERIFY_FAILED"):  # the system trust store
            fetch(f"{url}/ok.jpg", policy, FetchLimits(), time.monotonic() + 5)
        trusting = ssl.create_default_context(cafile=cert)
        trusting.sslsocket_class = fetch_mod.DeadlineSSLSocket
        monkeypatch.setattr(fetch_mod, "_TLS", trusting)
        Hostile.hosts_seen.clear()
        assert fetch(f"{url}/ok.jpg", policy, FetchLimits(), time.monotonic() + 5) == FILES["/ok.jpg"]
        assert sni[-1] == "tls.test" and Hostile.hosts_seen == [f"tls.test:{port}"]
        t0 = time.monotonic()
        with pytest.raises(Refused) as e:
            fetch(f"{url}/drip", policy, FetchLimits(), time.monotonic() + 2)
        assert e.value.status == "timeout" and time.monotonic() - t0 < 3.5
    assert guarded_network == []


@pytest.mark.parametrize("ip,problem", [
    ("8.8.8.8", None), ("2606:4700::1111", None), ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.0.1", "private"),
    ("169.254.169.254", "link_local"), ("fe80::1%eth0", "link_local"), ("fc00::1", "private"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("240.0.0.1", "reserved"), ("::ffff:127.0.0.1", "loopback"),
    ("2002:a00:1::", "private"), ("100.64.0.1", "not_global"), ("not-an-ip", "invalid_address")])
def test_address_rule(ip, problem):
    assert address_problem(ip) == problem


def test_resize_matches_img2dataset_bytes():
    """Our resize (no fd swap) gives img2dataset's Resizer output byte for byte."""
    import io

    import numpy as np
    from img2dataset.resizer import Resizer
    from PIL import Image

    from pipelines.ingest.images import ImageResizer

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    for mode in ("center_crop", "keep_ratio", "border", "no"):
        ours = ImageResizer(256, mode, 0, 95)(data)
        theirs = Resizer(256, mode, False, encode_quality=95)(io.BytesIO(data))
        assert ours == tuple(theirs[:5]), mode


@pytest.mark.slow  # a CLI subprocess: ~25 s of imports on a loaded 2-core machine
def test_missing_caption_column_exits_2(tmp_path):
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"URL": ["http://a/1"], "WIDTH": [300], "HEIGHT": [300]}), meta)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "filter", "--local", "--data-root",
         str(tmp_path / "data"), "--set", f"filter.metadata={meta}"],
        capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[3]), timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "filter.caption_col" in proc.stderr + proc.stdout
