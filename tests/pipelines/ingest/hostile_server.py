"""A loopback HTTP server that misbehaves on purpose: redirects, drips, endless bodies, bombs, opt-outs."""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def jpeg(w: int = 300, h: int = 300) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bomb(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w x h white pixels: tiny on the wire, w*h pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((w + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Hostile(BaseHTTPRequestHandler):
    """Routes by path; `self.server.other` is the base URL of the second host (127.0.0.2)."""

    protocol_version = "HTTP/1.1"
    files: dict[str, bytes] = {}
    hosts_seen: list[str] = []  # Host headers received (the name, while the socket used the IP)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, headers={"Location": location})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        p = self.path
        other = getattr(self.server, "other", "")
        self.hosts_seen.append(self.headers.get("Host", ""))
        try:
            if p in self.files:
                self._send(200, self.files[p], {"Content-Type": "image/jpeg"})
            elif p == "/redirect/private":
                self._redirect("http://private.test/x.jpg")
            elif p == "/redirect/metadata":
                self._redirect("http://169.254.169.254/latest/meta-data/")
            elif p == "/redirect/second-host":
                self._redirect(f"{other}/ok.jpg")
            elif p == "/redirect/file":
                self._redirect("file:///etc/passwd")
            elif p.startswith("/chain/"):
                n = int(p.rsplit("/", 1)[1])
                self._redirect(f"/chain/{n - 1}" if n > 0 else "/ok.jpg")
            elif p == "/opted-out":
                self._send(200, self.files["/ok.jpg"], {"X-Robots-Tag": "noai, noimageai"})
            elif p == "/opted-out-other-bot":
                self._send(200, self.files["/ok.jpg"], {"X-Robots-Tag": "otherbot: noai"})
            elif p == "/opted-out-racm3":
                self._send(200, self.files["/ok.jpg"], {"X-Robots-Tag": "racm3: noindex"})
            elif p == "/oversize":
                self.send_response(200)
                self.send_header("Content-Length", str(50 << 20))
                self.end_headers()
                self.wfile.write(b"\xff\xd8" + b"\0" * 1000)
            elif p == "/oversize-unannounced":  # no Content-Length: read until close
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"\0" * (3 << 20))
            elif p == "/endless":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                while True:
                    self.wfile.write(b"\0" * 65536)
            elif p == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                while True:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(1.0)
            elif p == "/drip-headers":
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(1.0)
            elif p == "/truncated":  # announces the whole image, sends half, hangs up
                body = self.files["/ok.jpg"]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            elif p == "/html":
                self._send(200, b"<!doctype html><p>not an image</p>", {"Content-Type": "text/html"})
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should


def self_signed(directory: str, name: str) -> tuple[str, str]:
    """(cert file, key file) of a self-signed certificate for DNS name `name`."""
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file


@contextlib.contextmanager
def tls_server(files: dict[str, bytes], cert_file: str, key_file: str
               ) -> Iterator[tuple[int, list[str]]]:
    """(port, SNI names seen) of an HTTPS `Hostile` server on 127.0.0.1."""
    import ssl

    sni: list[str] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.sni_callback = lambda sock, name, _ctx: sni.append(name or "")  # type: ignore[assignment,misc]
    Hostile.files = files
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], sni
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def hostile_servers(files: dict[str, bytes]) -> Iterator[tuple[str, str]]:
    """(base URL on 127.0.0.1, base URL on 127.0.0.2), both serving `Hostile`."""
    Hostile.files = files
    servers = [ThreadingHTTPServer((host, 0), Hostile) for host in ("127.0.0.1", "127.0.0.2")]
    bases = [f"http://{s.server_address[0]}:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.daemon_threads = True
        s.other = bases[1]  # type: ignore[attr-defined]
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield bases[0], bases[1]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def progressive_jpeg(w: int, h: int, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans: libjpeg decodes
    each repeat again over the whole image (a bogus progression is only a warning to it)."""
    import re

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 80, 200)).save(buf, format="JPEG", quality=80, progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    end = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]").search(data, last + 2).start()
    have = data.count(b"\xff\xda")  # flat image: no 0xFF 0xDA inside entropy data
    return data[:end] + data[last:end] * (scans - have) + data[end:]


def png_rgba16(w: int, h: int) -> bytes:
    """A flat 16-bit RGBA PNG (small on the wire): 8 bytes a pixel once decoded as it is."""
    import cv2
    import numpy as np

    img = np.empty((h, w, 4), np.uint16)
    img[:] = (30000, 40000, 50000, 32768)
    ok, out = cv2.imencode(".png", img)
    assert ok
    return out.tobytes()
