"""Trained model files (`train/<variant>.pt`): written by train, read by evaluation and generation."""

from __future__ import annotations

from typing import Any

import torch

from model.document import Vocab
from model.transformer import Transformer, TransformerConfig
from storage.fs import DataRoot


def save_model(path: str, model: Transformer, vocab: Vocab, lineage: dict[str, Any],
               params: dict[str, Any]) -> None:
    """The plain model for sampling and evaluation: weights, sizes, vocab and lineage."""
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                "vocab": {"n_text": vocab.n_text, "n_image": vocab.n_image,
                          "n_sentinels": vocab.n_sentinels},
                "lineage": dict(lineage), "train": params}, path)



def load_trained(root: DataRoot, variant: str = "ra-cm3",
                 device: str = "cpu") -> tuple[Transformer, Vocab, dict[str, Any]]:
    """(model in eval mode, vocab, saved record) from `<root>/train/<variant>.pt`."""
    path = root.artifact("train", variant, "pt")
    if not root.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run `racm3 run train --set "
                                f"train.variant={variant}` first")
    with root.fs.open(path, "rb") as f:
        rec = torch.load(f, map_location=device, weights_only=False)
    model = Transformer(TransformerConfig(**rec["model_config"]))
    model.load_state_dict(rec["model"])
    return model.to(device).eval(), Vocab(**rec["vocab"]), rec
