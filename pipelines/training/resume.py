"""Exact resume: the data stream's position (epoch, order position, RNG, packing pool) saved in
the Lightning checkpoint as plain tensors, ints and strings, so a weights-only load restores it."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from pipelines.training.sequences import SequenceStream, Unit

UNIT_ARRAYS = ("ids", "positions", "weights", "roles")


def encode_state(state: dict[str, Any]) -> dict[str, Any]:
    """A reader state as weights-only-loadable values (no numpy objects; big ints as strings)."""
    rng = state["rng"]
    return {"reader": int(state["reader"]), "n_readers": int(state["n_readers"]),
            "epoch": int(state["epoch"]), "cursor": int(state["cursor"]),
            "rng": {"bit_generator": rng["bit_generator"],
                    "state": {k: str(v) for k, v in rng["state"].items()},
                    "has_uint32": int(rng["has_uint32"]), "uinteger": int(rng["uinteger"])},
            "pool": [{**{a: torch.from_numpy(np.ascontiguousarray(getattr(u, a)))
                         for a in UNIT_ARRAYS}, "key": str(u.key)} for u in state["pool"]]}


def decode_state(enc: dict[str, Any]) -> dict[str, Any]:
    rng = enc["rng"]
    return {**enc, "rng": {"bit_generator": rng["bit_generator"],
                           "state": {k: int(v) for k, v in rng["state"].items()},
                           "has_uint32": rng["has_uint32"], "uinteger": rng["uinteger"]},
            "pool": [Unit(key=u["key"], **{a: u[a].numpy() for a in UNIT_ARRAYS})
                     for u in enc["pool"]]}


class StreamCheckpoint(L.Callback):
    """Tracks the stream state of the last trained batch of every reader and saves it with the
    checkpoint (gathered from every DDP rank); on resume, hands it to the stream before the data
    loader starts, so the resumed run sees exactly the batches an uninterrupted run would."""

    def __init__(self, stream: SequenceStream):
        self.stream = stream
        self.batches = 0  # batches trained on this rank (since step 0)
        self.readers: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        state = batch.get("stream_state") if isinstance(batch, dict) else None
        if state is not None:
            self.readers[int(state["reader"])] = state
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        mine = {str(r): encode_state(s) for r, s in self.readers.items()}
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)  # every rank dumps the checkpoint; rank 0 writes
            mine = {r: s for part in everyone for r, s in part.items()}
        return {"batches": self.batches, "readers": mine}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = int(state_dict["batches"])
        self.readers = {int(r): decode_state(s) for r, s in state_dict["readers"].items()}
        self.stream.resume = {"batches": self.batches, "readers": dict(self.readers)}
