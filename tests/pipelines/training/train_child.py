"""A training run in its own process, for kill and multi-process tests:
`python -m tests.pipelines.training.train_child ROOT CONFIG_JSON RECORD [HANG_STEP MARKER]`.

Runs stage `train` on ROOT with TrainConfig(**CONFIG_JSON), appending one JSON line per step
(step, rank, main-document keys, loss) to RECORD(.rank<r> under DDP); with HANG_STEP it writes
MARKER and sleeps at the start of that step, so the test can SIGKILL it at a known point.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import lightning as L

from pipelines.core.stage import execute_shard
from pipelines.training.train import TrainConfig, TrainStage
from storage.fs import DataRoot


class Recorder(L.Callback):
    """One line per trained step: what was trained on and the loss (flushed at once)."""

    def __init__(self, path: str, hang_step: int = -1, marker: str = ""):
        self.path, self.hang_step, self.marker = path, hang_step, marker
        self.keys: list[Any] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.hang_step:
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)  # the test kills us here
        self.keys = batch["keys"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        path = self.path if trainer.world_size == 1 else f"{self.path}.rank{trainer.global_rank}"
        with open(path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step - 1, "rank": trainer.global_rank,
                                "keys": self.keys, "loss": float(loss)}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_records(path: str) -> dict[int, dict[str, Any]]:
    """step -> the last record of that step (a resumed run re-does the steps after its checkpoint)."""
    out: dict[int, dict[str, Any]] = {}
    if os.path.exists(path):
        for line in open(path):
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def main(argv: list[str]) -> None:
    root, cfg = DataRoot(argv[0]), TrainConfig(**json.loads(argv[1]))
    hang = int(argv[3]) if len(argv) > 3 else -1
    stage = TrainStage([Recorder(argv[2], hang, argv[4] if len(argv) > 4 else "")])
    execute_shard(stage, root, cfg, stage.plan(root, cfg)[0])


if __name__ == "__main__":
    main(sys.argv[1:])
