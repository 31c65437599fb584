"""A quiet static HTTP server on 127.0.0.1 for the demo images (started and stopped by the flow)."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from storage.fs import DataRoot

log = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("http: " + format, *args)


class _Server(ThreadingHTTPServer):
    # The stdlib's backlog of 5 drops SYNs when many download threads connect at once; the
    # client's SYN retries (1 s, 3 s, 7 s) then eat the per-URL deadline.
    request_queue_size = 256
    daemon_threads = True


@contextlib.contextmanager
def serve_root_dir(root: DataRoot, directory: str, host: str = "127.0.0.1",
                   port: int = 0) -> Iterator[str]:
    """Serve a folder of the data root; one on an object store is copied to local disk first."""
    if root.is_local:
        with serve_directory(directory, host, port) as url:
            yield url
        return
    local = tempfile.mkdtemp(prefix="racm3-www-")
    try:
        root.fs.get(directory.rstrip("/") + "/", local + "/", recursive=True)
        with serve_directory(local, host, port) as url:
            yield url
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def serve_directory(directory: str, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `directory` at http://host:port until the block exits; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=directory)
    try:
        server = _Server((host, port), handler)
    except OSError as e:
        raise OSError(f"cannot serve the demo images on {host}:{port} ({e}); free the port or set "
                      "demo.port to another one") from e
    thread = threading.Thread(target=server.serve_forever, name="racm3-demo-http", daemon=True)
    thread.start()
    url = f"http://{host}:{server.server_address[1]}"
    log.info("serving %s at %s", directory, url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
