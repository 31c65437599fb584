"""Benchmark: a shard of crafted images through the download stage's per-URL path, beside its limits.

The inputs are built here and served from loopback: progressive JPEGs of thousands of scans,
16-bit RGBA PNGs, pixel bombs, a truncated body, and ordinary images. Prints, per input, its
status and CPU seconds; then the worst per-image CPU seconds, the peak RSS growth per download
thread, rows lost and download threads left running, beside the config limits that bound them.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines.ingest.download import DownloadConfig, build_downloader  # noqa: E402
from tests.pipelines.ingest.hostile_server import (  # noqa: E402
    hostile_servers,
    jpeg,
    png_bomb,
    png_rgba16,
    progressive_jpeg,
)


def inputs() -> dict[str, bytes]:
    return {
        "/ok.jpg": jpeg(),
        "/big-ok.jpg": jpeg(4000, 3000),
        "/progressive-12.jpg": progressive_jpeg(2048, 2048, 12),
        "/progressive-5000-8k.jpg": progressive_jpeg(8192, 4096, 5000),
        "/progressive-2000.jpg": progressive_jpeg(2048, 2048, 2000),
        "/progressive-at-limit-6k.jpg": progressive_jpeg(6000, 6000, 32),  # 36 MP, 32 scans
        "/rgba16-3000.png": png_rgba16(3000, 3000),
        "/rgba16-6000.png": png_rgba16(6000, 6000),
        "/bomb-20k.png": png_bomb(20000, 20000),
        "/bomb-6k.png": png_bomb(6000, 6000),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--copies", type=int, default=2, help="each input this many times in the shard")
    args = ap.parse_args()
    files = inputs()
    paths = [*files, "/truncated"] * args.copies
    with hostile_servers(files) as (base, _):
        cfg = DownloadConfig(allow_hosts=("127.0.0.1",), min_image_size=0, threads=args.threads,
                             url_timeout_s=20.0)
        dl = build_downloader(cfg)
        dl.one({"key": "w", "url": f"{base}/ok.jpg", "caption": "", "pwatermark": 0.0,
                "punsafe": 0.0, "similarity": 0.0}, time.monotonic() + 60)  # warm-up: imports
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu: dict[int, float] = {}

        def timed(i: int, p: str) -> dict:
            t = time.thread_time()
            row = dl.one({"key": str(i), "url": base + p, "caption": "", "pwatermark": 0.0,
                          "punsafe": 0.0, "similarity": 0.0}, time.monotonic() + 600)
            cpu[i] = time.thread_time() - t
            return row

        t0 = time.monotonic()
        rows = list(dl.pool.map(lambda a: timed(*a), enumerate(paths)))
        wall = time.monotonic() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
        dl.pool.shutdown(wait=True)
    left = [t.name for t in threading.enumerate() if t.name.startswith("racm3-dl")]
    for i, (p, r) in enumerate(zip(paths, rows, strict=True)):
        if i < len(files) + 1:
            print(f"{p:28s} {r['status']:18s} cpu {cpu[i]:6.2f}s  {(r['error_message'] or '')[:70]}")
    worst = max(cpu, key=cpu.get)  # type: ignore[arg-type]
    print(f"inputs tried: {len(paths)} ({len(files) + 1} kinds x {args.copies}), rows: {len(rows)}, "
          f"rows lost: {len(paths) - len(rows)}, download threads left running: {len(left)}")
    print(f"worst per-image CPU: {cpu[worst]:.2f}s ({paths[worst]}); shard wall {wall:.1f}s on "
          f"{args.threads} threads; load {os.getloadavg()[0]:.1f}")
    print(f"peak RSS growth: {peak:.0f} MB, {peak / args.threads:.0f} MB per download thread")
    print(f"limits: max_jpeg_scans={cfg.max_jpeg_scans}, max_decode_bytes={cfg.max_decode_bytes} "
          f"({cfg.max_decode_bytes / 2**20:.0f} MiB a thread, before resize scratch), "
          f"max_image_pixels={cfg.max_image_pixels}, max_bytes={cfg.max_bytes}, "
          f"url_timeout_s={cfg.url_timeout_s:g}")


if __name__ == "__main__":
    main()
