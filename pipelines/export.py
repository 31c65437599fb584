"""`racm3 export`: a trained checkpoint (`train/<name>.pt`) to `model.safetensors` + `config.json`
that plain PyTorch loads (docs/bring-your-own.md has the snippet; a test runs it)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.document import EOS, FIRST_SENTINEL, IMG_CLOSE, IMG_OPEN, IMG_SRC, INFILL, PAD, Vocab
from model.transformer import Transformer, TransformerConfig
from pipelines.training.checkpoints import load_trained
from storage.fs import DataRoot

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "racm3-cm3", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
TOKENIZER_KEYS = ("codebook", "text_tokenizer", "vocab", "index_fingerprint", "encoder")


def vocabulary(vocab: Vocab) -> dict[str, Any]:
    """The id layout a user needs to build prompts: specials, sentinels, text and image ranges."""
    return {"size": vocab.size, "n_text": vocab.n_text, "n_image": vocab.n_image,
            "n_sentinels": vocab.n_sentinels, "first_sentinel": FIRST_SENTINEL,
            "text_offset": vocab.text_offset, "image_offset": vocab.image_offset,
            "specials": {"pad": PAD, "eos": EOS, "infill": INFILL, "img_open": IMG_OPEN,
                         "img_src": IMG_SRC, "img_close": IMG_CLOSE},
            "fingerprint": vocab.fingerprint()}


def export_config(model: Transformer, vocab: Vocab, rec: dict[str, Any]) -> dict[str, Any]:
    lineage = rec.get("lineage", {})
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": model.cfg.to_dict(),
            "vocabulary": vocabulary(vocab),
            "tokenizers": {k: lineage[k] for k in TOKENIZER_KEYS if k in lineage},
            "train": rec.get("train", {})}


def weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict without the tied output projection (safetensors stores no shared tensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state["head.weight"]  # the same tensor as embed.weight; config.json says it is tied
    return state


def export_model(root: DataRoot, name: str, out: str) -> str:
    """Write `<out>/model.safetensors` and `<out>/config.json`; a failure leaves `out` untouched."""
    model, vocab, rec = load_trained(root, name)
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or remove it")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        save_file(weights(model), os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(export_config(model, vocab, rec), f, indent=2)
        if os.path.exists(out):
            os.rmdir(out)
        os.replace(tmp, out)  # all or nothing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported train/%s.pt to %s (%d parameters)", name, out, model.num_params())
    return out


class ExportError(ValueError):
    """An export folder that is incomplete or whose files are damaged; names the file."""


def load_export(folder: str) -> tuple[Transformer, Vocab, dict[str, Any]]:
    """An exported folder back into racm3's Transformer (what the doc snippet does by hand)."""
    cfg_path, w_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        arch, voc = cfg["architecture"], cfg["vocabulary"]
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{cfg_path} is missing or not an export config ({type(e).__name__}: {e})") from e
    try:
        state = load_file(w_path)
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{w_path} is missing or damaged (truncated?): {e}") from e
    model = Transformer(TransformerConfig(**arch))
    if arch.get("tie_embeddings", True):
        state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    vocab = Vocab(voc["n_text"], voc["n_image"], voc["n_sentinels"])
    return model.eval(), vocab, cfg
