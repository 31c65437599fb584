"""Trained model files (`train/<name>.pt`, name = train.name or the variant): written by train,
read by evaluation and generation. Always through fsspec, always loaded weights-only."""

from __future__ import annotations

import json
from typing import Any

import torch

from model.document import Vocab
from model.transformer import Transformer, TransformerConfig
from storage.fs import DataRoot


def save_model(root: DataRoot, path: str, model: Transformer, vocab: Vocab,
               lineage: dict[str, Any], params: dict[str, Any]) -> None:
    """The plain model for sampling and evaluation: weights, sizes, vocab and lineage."""
    rec = {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
           "vocab": {"n_text": vocab.n_text, "n_image": vocab.n_image,
                     "n_sentinels": vocab.n_sentinels},
           "lineage": plain(lineage), "train": plain(params)}
    with root.fs.open(path, "wb") as f:
        torch.save(rec, f)


def plain(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-like values only, so the record loads with weights_only=True."""
    return json.loads(json.dumps(d, default=str))


def load_trained(root: DataRoot, name: str = "ra-cm3",
                 device: str = "cpu") -> tuple[Transformer, Vocab, dict[str, Any]]:
    """(model in eval mode, vocab, saved record) from `<root>/train/<name>.pt`; `name` is the
    variant or an ablation's train.name. Weights-only: a crafted pickle is refused."""
    path = root.artifact("train", name, "pt")
    if not root.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run `racm3 run train --set "
                                f"train.variant={name}` (or train.name={name}) first")
    with root.fs.open(path, "rb") as f:
        rec = torch.load(f, map_location=device, weights_only=True)
    model = Transformer(TransformerConfig(**rec["model_config"]))
    model.load_state_dict(rec["model"])
    return model.to(device).eval(), Vocab(**rec["vocab"]), rec
