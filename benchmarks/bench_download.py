"""Benchmark: racm3's download stage vs img2dataset.download() called directly on the same URL
shards from the same local HTTP server, side by side in one run. Prints images/s and the ratio
(goal >= 0.87x img2dataset's throughput)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines.core.registry import load_config  # noqa: E402
from pipelines.core.runner import run_stage  # noqa: E402
from pipelines.demo.paths import www_dir  # noqa: E402
from pipelines.demo.server import serve_directory  # noqa: E402
from storage.fs import DataRoot  # noqa: E402


def racm3_download(root: DataRoot, cfgs: dict) -> tuple[int, float]:
    shutil.rmtree(root.stage_dir("download"), ignore_errors=True)
    t0 = time.perf_counter()
    report = run_stage("download", root, cfgs)
    return report.rows_out, time.perf_counter() - t0


def direct_download(root: DataRoot, cfgs: dict, out: str) -> tuple[int, float]:
    import img2dataset

    shutil.rmtree(out, ignore_errors=True)
    d = cfgs["download"]
    t0 = time.perf_counter()
    img2dataset.download(
        url_list=root.stage_dir("filter"), input_format="parquet", url_col="url",
        caption_col="caption", output_format="parquet", output_folder=out,
        image_size=d.image_size, resize_mode=d.resize_mode, min_image_size=d.min_image_size,
        processes_count=1, thread_count=d.threads, retries=d.retries, timeout=d.timeout,
        number_sample_per_shard=cfgs["filter"].shard_size, extract_exif=False,
        compute_hash="sha256", enable_wandb=False, save_additional_columns=["pwatermark", "punsafe", "similarity"])
    dt = time.perf_counter() - t0
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(os.path.join(out, f)).num_rows
               for f in os.listdir(out) if f.endswith(".parquet"))
    return rows, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entities", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = DataRoot(f"{d}/root")
        cfgs = load_config("demo", overrides=[f"demo.entities={args.entities}", "demo.port=18799",
                                              "filter.shard_size=250"])
        for stage in ("demo", "filter"):
            run_stage(stage, root, cfgs)
        ours, theirs = [], []
        with serve_directory(www_dir(root), port=18799):
            for _ in range(args.repeats):  # alternate so machine noise hits both alike
                n, dt = racm3_download(root, cfgs)
                ours.append(n / dt)
                n2, dt2 = direct_download(root, cfgs, f"{d}/direct")
                theirs.append(n2 / dt2)
        best_ours, best_theirs = max(ours), max(theirs)
        print(f"download: racm3 stage   {best_ours:8.1f} images/s  ({n} rows)")
        print(f"download: img2dataset   {best_theirs:8.1f} images/s  ({n2} rows)")
        print(f"download: ratio racm3 / img2dataset = {best_ours / best_theirs:.2f}x (goal >= 0.87x)")


if __name__ == "__main__":
    main()
