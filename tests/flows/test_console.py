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


CHILD = r"""
import logging, torch
from flows.console import setup_logging
setup_logging()
import lightning as L  # imported after logging is set up, as the stages do
from pipelines.demo.fit_vqgan import route_lightning_logs
from pipelines.training.steplog import StepLog

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)
    def training_step(self, batch, i):
        return self.w(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

route_lightning_logs()
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
t = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[StepLog("toy", 3, every_s=0.0)])
t.fit(M(), data)
"""


def test_a_lightning_fit_prints_only_racm3_lines(tmp_path):
    """Lightning's own handler ("INFO: GPU available", "💡 Tip") and its pytree deprecation warning
    never reach the console; the step log does, once per line."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "💡" not in text and "INFO: GPU available" not in text and "LeafSpec" not in text, text
    assert text.count("toy: step 3/3 (100%)") == 1, text
    assert "toy: step 1/3" in text and "steps/s" in text, text
