"""Every stage through fsspec on an object store: the demo end to end on an `s3://` data root.

A local S3-compatible server (moto's server mode on 127.0.0.1) is started by the test; fsspec
reaches it through FSSPEC_S3_* environment variables, so every process (CLI, Beam workers,
Prefect tasks) sees the same store. Nothing is mocked in the pipeline itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SMALL_DEMO, free_port

moto_server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
TINY = [*SMALL_DEMO, "fit_clip.max_steps=2", "fit_clip.batch_size=8",
        "fit_vqgan.image_size=16", "fit_vqgan.codebook_size=16", "fit_vqgan.channels=8",
        "fit_vqgan.embed_dim=4", "fit_vqgan.max_steps=2", "fit_vqgan.batch_size=8",
        "fit_vqgan.bpe_vocab_size=64", "fit_vqgan.kmeans_codes=0", "fit_vqgan.kmeans_iters=2",
        "tokenize.image_size=16", "tokenize.codebook_size=16", "filter.shard_size=20",
        "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1",
        "train.checkpoint_every=1", "train.progress_bar=false",
        "evaluate.max_images=3", "evaluate.image_samples=1", "evaluate.caption_samples=1",
        "evaluate.max_caption_tokens=4", "evaluate.bootstrap=50", "evaluate.show=1"]


@pytest.fixture
def s3_env(tmp_path) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with bucket `racm3`; the environment that points fsspec at it."""
    port = free_port()
    proc = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "racm3", "AWS_SECRET_ACCESS_KEY": "racm3",
           "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    try:
        deadline = time.time() + 30
        while True:
            try:
                import boto3

                boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                             aws_access_key_id="racm3",
                             aws_secret_access_key="racm3").create_bucket(Bucket="racm3")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield env
    finally:
        proc.terminate()
        proc.wait(10)


def racm3(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "racm3"), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def s3(env: dict[str, str]):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]},
                             key="racm3", secret="racm3")


@pytest.mark.slow
def test_demo_end_to_end_on_s3(s3_env):
    """`racm3 demo` on s3:// through train and evaluate; then status, verify and inspect there."""
    uri = "s3://racm3/demo"
    port = free_port()
    done = racm3(s3_env, "demo", "--data-root", uri, *sets([*TINY, f"demo.port={port}"]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fs = s3(s3_env)
    metrics = json.loads(fs.cat("racm3/demo/evaluate/main.metrics.json"))
    assert {"ra-cm3", "vanilla"} <= set(metrics["models"])
    assert fs.exists("racm3/demo/train/ra-cm3.pt") and fs.exists("racm3/demo/index/main.manifest.json")
    assert not fs.glob("racm3/demo/**/*.tmp*"), "temp objects left behind"
    verify = racm3(s3_env, "verify", "--data-root", uri)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    rows = racm3(s3_env, "inspect", "--data-root", uri, "--format", "json",
                 "select count(*) as n from download where status = 'success'")
    assert rows.returncode == 0, rows.stderr
    assert json.loads(rows.stdout)[0]["n"] > 0


def test_filter_and_download_on_s3(s3_env):
    """The ingest stages and the lease on an object store, in a few seconds (default test run)."""
    uri, port = "s3://racm3/ingest", free_port()
    args = sets([*SMALL_DEMO, f"demo.port={port}", "filter.shard_size=40"])
    for stage in ("demo", "filter"):
        r = racm3(s3_env, "run", stage, "--local", "--data-root", uri, *args, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    fs = s3(s3_env)
    shards = fs.glob("racm3/ingest/filter/*.parquet")
    assert shards and len(fs.glob("racm3/ingest/filter/*.manifest.json")) == len(shards)
    again = racm3(s3_env, "run", "filter", "--local", "--data-root", uri, *args, timeout=300)
    assert again.returncode == 0 and "skipped" in again.stdout
