"""Exact resume: training SIGKILLed in a subprocess after a checkpoint, then resumed, trains on
the same batches with the same losses as an uninterrupted run (CPU, fixed seeds, 1 thread)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.core.stage import execute_shard
from pipelines.training.train import TrainConfig, TrainStage
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.training.corpus_factory import make_corpus
from tests.pipelines.training.train_child import Recorder, read_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=3, seq_len=72, progress_bar=False, log_every=1,
                                 warmup_steps=2, accelerator="cpu", threads=1, max_steps=10,
                                 checkpoint_every=3, mask_prob=0.5), **kw})


def kill_at(root: DataRoot, cfg: TrainConfig, record: str, step: int, tmp_path) -> None:
    """Run training in a child process and SIGKILL it once it reaches `step`."""
    marker = str(tmp_path / "marker")
    params = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.pipelines.training.train_child", root.path,
         json.dumps(params), record, str(step), marker], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while not os.path.exists(marker):
        if child.poll() is not None:
            raise AssertionError(f"child exited early: {child.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            child.kill()
            raise AssertionError("child never reached the kill step")
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("workers,kill_step,resume_step", [(0, 8, 6), (2, 5, 3)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, workers, kill_step,
                                                          resume_step):
    cfg = config(num_workers=workers)
    ref_root, root = DataRoot(str(tmp_path / "ref")), DataRoot(str(tmp_path / "run"))
    for r in (ref_root, root):
        make_corpus(r, n=12, shards=2, packed=True)
    ref_rec, rec = str(tmp_path / "ref.jsonl"), str(tmp_path / "run.jsonl")
    stage = TrainStage([Recorder(ref_rec)])
    execute_shard(stage, ref_root, cfg, stage.plan(ref_root, cfg)[0])

    kill_at(root, cfg, rec, kill_step, tmp_path)
    assert read_manifest(root, "train", "ra-cm3") is None  # the shard is not done
    killed = read_records(rec)
    assert sorted(killed) == list(range(kill_step))
    stage = TrainStage([Recorder(rec)])
    m = execute_shard(stage, root, cfg, stage.plan(root, cfg)[0])
    assert m.metrics["resumed_from_step"] == resume_step and m.metrics["steps"] == 10

    ref, run = read_records(ref_rec), read_records(rec)  # run: the resumed steps overwrite
    assert sorted(run) == sorted(ref) == list(range(10))
    for step in range(10):
        assert run[step]["keys"] == ref[step]["keys"], step  # the same documents, in order
        assert run[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-6), step
    # steps re-done after the checkpoint saw exactly what the killed run had seen
    for step in range(resume_step, kill_step):
        assert killed[step]["keys"] == run[step]["keys"]
