"""Shared fixtures: quiet offline environment, temp data roots, a tiny demo data set served locally."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402

from storage.fs import DataRoot  # noqa: E402

SMALL_DEMO = ["demo.entities=24", "demo.eval_images=6", "demo.max_docs_per_entity=6",
              "demo.dirty_fraction=0.08", "demo.failing_fraction=0.05", "filter.shard_size=40"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: the 2 shared cores stall OpenMP teams of two.

    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def root(tmp_path) -> DataRoot:
    return DataRoot(str(tmp_path / "data"))


@pytest.fixture
def small_demo(tmp_path):
    """(root, cfgs, overrides) for a tiny generated demo whose URLs use a free local port."""
    from pipelines.core.registry import load_config
    from pipelines.core.runner import run_stage

    overrides = [*SMALL_DEMO, f"demo.port={free_port()}"]
    cfgs = load_config("demo", overrides=overrides)
    r = DataRoot(str(tmp_path / "data"))
    report = run_stage("demo", r, cfgs)
    assert report.ok
    return r, cfgs, overrides


@pytest.fixture
def served(small_demo):
    """The tiny demo with its HTTP server running on 127.0.0.1 for the test's duration."""
    from pipelines.demo.paths import www_dir
    from pipelines.demo.server import serve_directory

    r, cfgs, overrides = small_demo
    with serve_directory(www_dir(r), "127.0.0.1", cfgs["demo"].port):
        yield r, cfgs, overrides
