"""What a tokenizer checkpoint must agree with, and the error that names the disagreeing field."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


class CheckpointError(ValueError):
    """A tokenizer checkpoint that is missing, unreadable or disagrees with its config.

    `field` is the tokenize config field to fix (`checkpoint`, `vqgan_config`, `codebook_size`, ...).
    """

    def __init__(self, message: str, field: str = "checkpoint"):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Expect:
    """What the config requires of a checkpoint; None means "whatever it has"."""

    n_embed: int | None = None
    factor: int | None = None
    resolution: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_torch(path: str, allow_pickle: bool = False) -> dict[str, Any]:
    """A checkpoint file as a dict, weights-only unless the user trusts it."""
    if not os.path.exists(path):
        raise CheckpointError(f"VQGAN checkpoint {path} does not exist: run `racm3 run fit-vqgan` "
                              "or set tokenize.checkpoint to a taming-transformers .ckpt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise CheckpointError(
            f"could not load {path} weights-only ({type(e).__name__}: {e}); if you trust the "
            "file, set tokenize.allow_pickle = true") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def refuse_mismatch(path: str, have: dict[str, int], expect: Expect) -> None:
    """Refuse a codebook size, factor or resolution other than the config's, naming the field."""
    checks = [("codebook size", "n_embed", "codebook_size"), ("downsampling factor", "factor", "factor"),
              ("resolution", "resolution", "image_size")]
    for what, key, cfg_field in checks:
        want = getattr(expect, key)
        if want is not None and key in have and have[key] != want:
            raise CheckpointError(
                f"{path} has {what} {have[key]} but tokenize.{cfg_field} = {want}; point the "
                "config at a matching checkpoint or change the config", cfg_field)
