"""Fetch one URL under the network policy: checked addresses, own redirects, byte cap, wall deadline.

urllib resolves and connects by host name, so the address it reaches is never seen and a DNS answer
can change between a check and the connect (rebinding). Here each hop is resolved once, every
address is judged by `NetPolicy`, the socket connects to that IP (the Host header and TLS SNI carry
the name), and the peer address of the connected socket is judged again. Every socket read
re-arms its timeout to what is left of the URL's wall-clock deadline, so a server that drips one
byte a second cannot hold a thread past it.
"""

from __future__ import annotations

import http.client
import math
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from pipelines.ingest.netpolicy import NetPolicy

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16
UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


class Refused(Exception):
    """A URL that ends as a row: `status` is the row's status, the message its error_message."""

    def __init__(self, status: str, message: str, http_status: int | None = None,
                 retry_after: str | None = None):
        self.status = status
        self.http_status, self.retry_after = http_status, retry_after  # for back-off on 429/503
        super().__init__(message)


@dataclass(frozen=True)
class Small:
    """A small response read whole or up to a cap (robots.txt, tdmrep.json)."""

    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool


@dataclass(frozen=True)
class FetchLimits:
    """Per-URL limits (from DownloadConfig)."""

    max_bytes: int = 16 << 20
    max_redirects: int = 5
    user_agent_token: str = "racm3"
    disallowed_directives: frozenset[str] = frozenset()
    honour_tdm_header: bool = False  # a `tdm-reservation: 1` response header opts out

    @property
    def user_agent(self) -> str:
        tok = self.user_agent_token
        return UA + (f" (compatible; {tok}; +https://github.com/rom1504/img2dataset)" if tok else "")


class _Deadline:
    """Mixin: every read re-arms the socket timeout to what is left of `deadline` (monotonic)."""

    deadline: float = math.inf

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed while reading")
        self.settimeout(left)  # type: ignore[attr-defined]

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)  # type: ignore[misc]

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)  # type: ignore[misc]


class DeadlineSocket(_Deadline, socket.socket):
    pass


class DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    pass


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.sslsocket_class = DeadlineSSLSocket
    return ctx


_TLS = _tls_context()


def connect(host: str, port: int, policy: NetPolicy, deadline: float) -> socket.socket:
    """A TCP socket connected to an address of `host` that the policy allows (checked twice)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Refused("failed_to_download", f"dns: cannot resolve {host}: {e}") from e
    refusal, last_err = None, None
    for family, stype, proto, _, addr in infos:
        ip = str(addr[0])
        why = policy.refusal(host, port, ip)
        if why is not None:
            refusal = refusal or f"{why}: {ip} (host {host})"
            continue
        sock = DeadlineSocket(family, stype, proto)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(addr)
            peer = str(sock.getpeername()[0])
            if policy.refusal(host, port, peer) is not None:  # the address really reached
                raise Refused("refused_address", f"{policy.refusal(host, port, peer)}: {peer}")
            sock.deadline = deadline
            return sock
        except Refused:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            last_err = e
    if last_err is not None:
        if isinstance(last_err, TimeoutError):
            raise Refused("timeout", f"connect: {host}:{port} timed out")
        raise Refused("failed_to_download", f"connect: {host}:{port}: {last_err}")
    raise Refused("refused_address", refusal or f"no_address: {host} resolved to nothing")


def _open(url: str, policy: NetPolicy, deadline: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("refused_url", f"scheme: {scheme or 'none'!r} is not http(s)")
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise Refused("refused_url", f"port: {e}") from e
    if not host:
        raise Refused("refused_url", "host: the URL has no host")
    sock: socket.socket = connect(host, port, policy, deadline)
    if scheme == "https":
        tls = _TLS.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        tls.deadline = deadline  # type: ignore[attr-defined]
        tls.settimeout(max(deadline - time.monotonic(), 0.001))
        tls.do_handshake()
        sock = tls
    conn = http.client.HTTPConnection(host, port)  # Host header from the name, socket by the IP
    conn.sock = sock
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return conn, target


def fetch(url: str, policy: NetPolicy, limits: FetchLimits, deadline: float) -> bytes:
    """The body of `url` (following up to `max_redirects` redirects) or raises Refused."""
    from img2dataset.downloader import is_disallowed  # img2dataset's X-Robots-Tag parser

    for hop in range(limits.max_redirects + 1):
        conn = None
        try:
            conn, target = _open(url, policy, deadline)
            conn.request("GET", target, headers={"User-Agent": limits.user_agent})
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise Refused("failed_to_download", f"HTTP Error {resp.status}: no Location")
                url = urljoin(url, location.strip())
                continue
            if resp.status != 200:
                raise Refused("failed_to_download", f"HTTP Error {resp.status}: {resp.reason}",
                              resp.status, resp.getheader("Retry-After"))
            if limits.honour_tdm_header and (tdm := resp.getheader("tdm-reservation")) \
                    and tdm.strip() == "1":
                raise Refused("opted_out_tdm", "tdm-reservation: 1 (TDMRep header)")
            if limits.disallowed_directives and is_disallowed(
                    resp.headers, limits.user_agent_token, limits.disallowed_directives):
                tags = "; ".join(resp.headers.get_all("X-Robots-Tag") or [])
                raise Refused("opted_out", f"X-Robots-Tag: {tags}")
            return _read_capped(resp, limits.max_bytes)
        except Refused as e:
            if hop:  # say that a redirect led here (a public page pointing at a private address)
                raise Refused(e.status, f"{e} (after {hop} redirect{'s' * (hop > 1)})") from e
            raise
        except TimeoutError as e:
            raise Refused("timeout", f"timeout: no complete response by the URL deadline ({e})") from e
        except (http.client.HTTPException, OSError) as e:
            raise Refused("failed_to_download", f"{type(e).__name__}: {e}") from e
        finally:
            if conn is not None:
                conn.close()
    raise Refused("too_many_redirects", f"redirects: more than {limits.max_redirects}")


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > max_bytes:
        raise Refused("too_large", f"too_large: Content-Length {int(length)} > {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = resp.read(CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise Refused("too_large", f"too_large: body over {max_bytes} bytes")
        chunks.append(chunk)


def get_small(url: str, policy: NetPolicy, limits: FetchLimits, deadline: float,
              cap: int) -> Small:
    """GET `url` following redirects; any status is returned, the body cut at `cap` bytes."""
    for _ in range(limits.max_redirects + 1):
        conn = None
        try:
            conn, target = _open(url, policy, deadline)
            conn.request("GET", target, headers={"User-Agent": limits.user_agent})
            resp = conn.getresponse()
            if resp.status in REDIRECTS and resp.getheader("Location"):
                url = urljoin(url, str(resp.getheader("Location")).strip())
                continue
            body = resp.read(cap + 1)  # a 10 MB robots.txt costs cap + 1 bytes, then we hang up
            return Small(resp.status, dict(resp.getheaders()), body[:cap], len(body) > cap)
        except TimeoutError as e:
            raise Refused("timeout", f"timeout: {e}") from e
        except (http.client.HTTPException, OSError) as e:
            raise Refused("failed_to_download", f"{type(e).__name__}: {e}") from e
        finally:
            if conn is not None:
                conn.close()
    raise Refused("too_many_redirects", f"redirects: more than {limits.max_redirects}")
