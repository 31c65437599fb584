"""Periodic progress lines for a Lightning fit: step, loss, steps/s and ETA every few seconds.

Lightning's own bar is tqdm, which racm3's console turns off (TQDM_DISABLE) and which prints
nothing useful into a log file; a person watching a 5-minute training needs to see it move.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

from pipelines.core.progress import LOG_EVERY_S

log = logging.getLogger("racm3")


def eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class StepLog(L.Callback):
    """One line per `every_s` seconds of training, and one at the end."""

    def __init__(self, label: str, max_steps: int, every_s: float = LOG_EVERY_S):
        self.label, self.max_steps, self.every_s = label, max_steps, every_s
        self.t0 = self.last = 0.0
        self.first_step = self.logged_step = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.t0 = self.last = time.monotonic()
        self.first_step = trainer.global_step  # a resumed run starts past 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        if trainer.is_global_zero and now - self.last >= self.every_s:
            self.last, self.logged_step = now, trainer.global_step
            log.info(self.line(trainer, outputs, now))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.logged_step != trainer.global_step:  # not twice
            log.info(self.line(trainer, None, time.monotonic()))

    def line(self, trainer: L.Trainer, outputs: Any, now: float) -> str:
        step, elapsed = trainer.global_step, now - self.t0
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        left = (self.max_steps - step) / rate if rate > 0 else float("nan")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_s = f", loss {float(loss):.3f}" if loss is not None else ""
        tail = f", ETA {eta(left)}" if step < self.max_steps and rate > 0 else f", {eta(elapsed)}"
        return (f"{self.label}: step {step}/{self.max_steps} ({100 * step / self.max_steps:.0f}%)"
                f"{loss_s}, {rate:.2f} steps/s{tail}")
