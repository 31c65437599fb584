"""What an evaluation reads, checked against what the models were trained on: tokenizers, retriever,
both checkpoints, the memory's tokens and captions (refused with a fix when the lineage differs)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.clip_encoder import resolve_device
from model.document import Vocab
from model.transformer import Transformer
from pipelines.core.registry import config_of
from pipelines.retrieval.faiss_index import LoadedIndex
from pipelines.retrieval.search import Retriever
from pipelines.tokens.tokenizers import Tokenizers, load_tokenizers
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import LineageError, load_tokens
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table

GENERATORS = ("ra-cm3", "vanilla")  # the two trained models, by role
MODELS = (*GENERATORS, "retrieval-baseline")


@dataclass
class Setup:
    """Everything the evaluation reads: tokenizers, retriever, both models, the memory's tokens."""

    tok: Tokenizers
    tok_cfg: Any  # the tokenize section the token shards were made with
    retriever: Retriever
    models: dict[str, Transformer]  # role ("ra-cm3", "vanilla") -> model
    vocab: Vocab
    memory: dict[str, np.ndarray]  # key -> encoded document ids
    memory_captions: dict[str, str]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return self.tok_cfg.grid


def retrieve_config(root: DataRoot, k: int) -> Any:
    """The retrieve stage's thresholds (as the training neighbours used), keeping k neighbours."""
    cfg = config_of(root, "retrieve", missing_ok=True)
    return replace(cfg, k_max=k, top_n=max(cfg.top_n, k + 1), use_gpu=False)


def check_lineage(variant: str, lineage: dict[str, Any], codebook: str, text_fp: str,
                  index: LoadedIndex, random_neighbours: bool = False) -> None:
    """Refuse a checkpoint trained on another codebook, text tokenizer or index.

    The index is required of a model trained with retrieved neighbours (RA-CM3); a model trained
    with random neighbours (the relevance ablation, `train.random_neighbours`) has no index lineage.
    """
    want = {"codebook": codebook, "text_tokenizer": text_fp}
    if "index_fingerprint" in lineage or (variant == "ra-cm3" and not random_neighbours):
        want["index_fingerprint"] = index.digest
    for name, value in want.items():
        if lineage.get(name) != value:
            raise LineageError(
                f"the {variant} checkpoint was trained with {name} {lineage.get(name)!r} but the "
                f"evaluation's retriever/tokenizer has {value!r}: re-run `racm3 run train --set "
                f"train.variant={variant}` on the current tokens and index, or evaluate the data "
                f"root the checkpoint was trained in")


def checkpoints(cfg: Any) -> dict[str, str]:
    """role -> checkpoint name under train/."""
    return {"ra-cm3": cfg.ra_checkpoint, "vanilla": cfg.vanilla_checkpoint}


def load_setup(root: DataRoot, cfg: Any) -> Setup:
    tok_cfg = config_of(root, "tokenize")
    tok = load_tokenizers(root, tok_cfg)
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    retriever = Retriever(root, retrieve_config(root, cfg.k), device)
    vocab, memory, mem_lineage = load_tokens(root)
    models, records = {}, {}
    for role, name in checkpoints(cfg).items():
        model, v, rec = load_trained(root, name, device)
        check_lineage(role, rec["lineage"], tok.codebook, tok.text_fp, retriever.index,
                      bool(rec.get("train", {}).get("random_neighbours")))
        if v != vocab or mem_lineage["codebook"] != tok.codebook:
            raise LineageError(f"the {role} checkpoint's vocabulary {v} differs from the token "
                               f"shards' {vocab}: re-run tokenize and train together")
        models[role], records[role] = model, rec
    return Setup(tok, tok_cfg, retriever, models, vocab, memory, memory_captions(root), records)


def memory_captions(root: DataRoot) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in list_manifests(root, "tokenize"):
        t = read_table(root, root.artifact("tokenize", m.shard_id, "parquet"), ["key", "caption"])
        out.update(zip(t["key"].to_pylist(), (c or "" for c in t["caption"].to_pylist()), strict=True))
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, R, R) in [-1, 1] -> PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def decode_codes(setup: Setup, codes: np.ndarray) -> list[Image.Image]:
    """(B, g*g) raw codes -> PIL images through the VQGAN decoder."""
    g = setup.grid
    return to_pil(setup.tok.vqgan.decode(torch.as_tensor(codes, dtype=torch.long).view(-1, g, g)))


def memory_image(setup: Setup, key: str) -> Image.Image | None:
    """A memory document's image, decoded from its tokens (None when it has none)."""
    if key not in setup.memory:
        return None
    _, codes = setup.vocab.decode(setup.memory[key].tolist())
    return decode_codes(setup, np.asarray([codes]))[0] if codes else None
