"""The demo console: library tips, open_clip INFO chatter and Lightning banners are dropped."""

from __future__ import annotations

import logging

from flows.console import DropChatter, DropTaskCompleted


def record(name: str, msg: str, level: int = logging.INFO, path: str = "x.py") -> logging.LogRecord:
    return logging.LogRecord(name, level, path, 1, msg, None, None)


def test_chatter_dropped_warnings_kept():
    f = DropChatter(verbose=False)
    assert not f.filter(record("lightning.pytorch.utilities.rank_zero", "💡 Tip: try litmodels"))
    assert not f.filter(record("root", "Loaded ViT-B-32 model config.",
                               path="/venv/site-packages/open_clip/factory.py"))
    assert not f.filter(record("lightning.pytorch.utilities.rank_zero", "GPU available: False"))
    assert f.filter(record("lightning.pytorch", "bad", logging.WARNING))
    assert not f.filter(record("root", "apitools not found, and bigquery ...", logging.WARNING))
    assert f.filter(record("racm3", "filter: 1/2 shards, 40 rows"))
    assert DropChatter(verbose=True).filter(record("lightning.pytorch", "GPU available: False"))
    assert not DropChatter(verbose=True).filter(record("lightning.pytorch", "💡 Tip: x"))
    t = DropTaskCompleted()
    assert not t.filter(record("prefect.task_runs", "Finished in state Completed()"))
    assert t.filter(record("prefect.task_runs", "Finished in state Failed('x')", logging.ERROR))
