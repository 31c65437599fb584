"""Benchmark: racm3's download stage vs img2dataset at its best setting, side by side in one run.

Both read the same URL shards (the filter stage's output) from the same local HTTP server, which
runs in its own process so neither client shares a GIL with it. img2dataset runs with one process
per core and `--threads` threads per process (its recommended setting); racm3 runs with one
worker per core and the same threads per worker, once in its default mode (`beam.direct_running_mode
= "auto"`: threads of this process below `beam.process_min_rows` URLs) and once on Beam's
DirectRunner with one worker process per core. Prints images/s, the ratios (goal >= 1.15x) and
racm3's scaling from 1 worker to all cores. Asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow.parquet as pq  # noqa: E402

from pipelines.core.registry import load_config  # noqa: E402
from pipelines.core.runner import run_stage  # noqa: E402
from pipelines.demo.paths import www_dir  # noqa: E402
from storage.fs import DataRoot  # noqa: E402

PORT = 18799


def _serve(directory: str) -> None:
    from pipelines.demo.server import serve_directory

    with serve_directory(directory, "127.0.0.1", PORT):
        while True:
            time.sleep(3600)


def wait_for_port(port: int, timeout_s: float = 120.0) -> None:
    """Until the server accepts connections (its process starts slowly on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def racm3(root: DataRoot, overrides: list[str], workers: int,
          mode: str = "auto") -> tuple[int, int, float]:
    """(rows, successes, seconds) of `racm3 run download --local` with `workers` workers."""
    shutil.rmtree(root.stage_dir("download"), ignore_errors=True)
    cfgs = load_config("demo", overrides=[*overrides, f"beam.direct_num_workers={workers}",
                                          f"beam.direct_running_mode={mode}"])
    t0 = time.perf_counter()
    report = run_stage("download", root, cfgs)
    dt = time.perf_counter() - t0
    ok = sum(m.get("success", 0) for m in report.metrics.values())
    return report.rows_out, ok, dt


def img2dataset_run(root: DataRoot, overrides: list[str], out: str, processes: int
                    ) -> tuple[int, int, float]:
    """(rows, successes, seconds) of img2dataset.download() over the same URL shards."""
    import img2dataset

    shutil.rmtree(out, ignore_errors=True)
    cfgs = load_config("demo", overrides=overrides)
    d = cfgs["download"]
    t0 = time.perf_counter()
    img2dataset.download(
        url_list=root.stage_dir("filter"), input_format="parquet", url_col="url",
        caption_col="caption", output_format="parquet", output_folder=out,
        image_size=d.image_size, resize_mode=d.resize_mode, min_image_size=d.min_image_size,
        processes_count=processes, thread_count=d.threads, retries=d.retries, timeout=10,
        number_sample_per_shard=cfgs["filter"].shard_size, extract_exif=False,
        compute_hash="sha256", enable_wandb=False,
        save_additional_columns=["pwatermark", "punsafe", "similarity"])
    dt = time.perf_counter() - t0
    tables = [pq.read_table(os.path.join(out, f), columns=["status"])
              for f in os.listdir(out) if f.endswith(".parquet")]
    rows = sum(t.num_rows for t in tables)
    ok = sum(t["status"].to_pylist().count("success") for t in tables)
    return rows, ok, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entities", type=int, default=1300)  # ~4,000 URLs
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-processes", dest="processes", action="store_false",
                    help="skip the run on Beam worker processes (their start-up is slow)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    overrides = [f"demo.entities={args.entities}", f"demo.port={PORT}", "filter.shard_size=250",
                 f"download.threads={args.threads}"]
    with tempfile.TemporaryDirectory() as d:
        root = DataRoot(f"{d}/root")
        cfgs = load_config("demo", overrides=overrides)
        for stage in ("demo", "filter"):
            run_stage(stage, root, cfgs)
        server = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(www_dir(root),), daemon=True)
        server.start()
        wait_for_port(PORT)
        runs = {"all": lambda: racm3(root, overrides, cores),
                "procs": lambda: racm3(root, overrides, cores, "multi_processing"),
                "i2d": lambda: img2dataset_run(root, overrides, f"{d}/i2d", cores),
                "one": lambda: racm3(root, overrides, 1)}
        if not args.processes:
            del runs["procs"]
        results: dict[str, list[tuple[int, int, float]]] = {k: [] for k in runs}
        try:
            for _ in range(args.repeats):  # alternate so machine noise hits all alike
                for k, fn in runs.items():
                    results[k].append(fn())
        finally:
            server.terminate()
    best = {k: max(v, key=lambda r: r[1] / r[2]) for k, v in results.items()}
    rate = {k: r[1] / r[2] for k, r in best.items()}
    for k, label in (("all", f"racm3 default, {cores} workers"),
                     ("procs", f"racm3, {cores} Beam processes"),
                     ("i2d", f"img2dataset, {cores} procs"), ("one", "racm3, 1 worker")):
        if k not in best:
            continue
        rows, ok, dt = best[k]
        print(f"download: {label:<28} {rate[k]:7.1f} images/s  ({ok}/{rows} ok in {dt:.1f}s, "
              f"{args.threads} threads per worker)")
    for k, label in (("all", "racm3 default"), ("procs", "racm3 Beam processes")):
        if k in rate:
            print(f"download: ratio {label} / img2dataset at {cores} cores = "
                  f"{rate[k] / rate['i2d']:.2f}x (goal >= 1.15x)")
    print(f"download: racm3 default scaling {cores} cores / 1 = {rate['all'] / rate['one']:.2f}x")
    print(f"download: load average at the end {os.getloadavg()[0]:.2f} on {cores} cores")


if __name__ == "__main__":
    main()
