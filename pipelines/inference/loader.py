"""The one loader under evaluation and generation: trained checkpoints, their tokenizers, the
memory (token documents, captions, index; the data root's own or another root's, swapped in) and
the retriever, checked by one lineage policy."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.clip_encoder import resolve_device
from model.document import Vocab
from model.images import to_tensor
from model.transformer import Transformer
from pipelines.core.registry import config_of
from pipelines.inference.images import at_size, decode_codes
from pipelines.inference.lineage_policy import check_checkpoint, check_index
from pipelines.inference.memory import check_memory, fingerprints, memory_captions, open_memory
from pipelines.inference.retrieval import inference_rule
from pipelines.retrieval.search import Retriever, SearchRule
from pipelines.tokens.tokenizers import Tokenizers, load_tokenizers
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import load_tokens
from storage.fs import DataRoot

log = logging.getLogger(__name__)


@dataclass
class Inference:
    """Trained models (by role) with their tokenizers and memory, ready to prompt; `model` is the
    active one (`use` switches). The retriever and the memory's captions load on first use and
    are shared by every `use(role)` copy (one CLIP and index, not one per call)."""

    root: DataRoot
    role: str
    models: dict[str, Transformer]  # role ("ra-cm3", "vanilla", ...) -> model
    records: dict[str, dict[str, Any]]  # role -> the checkpoint's saved record
    vocab: Vocab
    tok: Tokenizers
    tok_cfg: Any  # the tokenize section the memory's tokens were made with (a TokenizeConfig)
    memory: dict[str, np.ndarray]  # key -> encoded document ids
    rule: SearchRule  # the redundancy rule retrieval applies
    device: str = "cpu"
    shared: dict[str, Any] = field(default_factory=dict)
    memory_root: DataRoot | None = None  # another root's memory swapped in (None = `root`'s own)

    @property
    def memory_at(self) -> DataRoot:
        """The data root whose index, key map and token shards are the memory."""
        return self.memory_root or self.root

    @property
    def model(self) -> Transformer:
        return self.models[self.role]

    @property
    def variant(self) -> str:
        return self.role

    @property
    def grid(self) -> int:
        return int(self.tok_cfg.grid)

    @property
    def image_size(self) -> int:
        return int(self.tok_cfg.image_size)

    @property
    def retriever(self) -> Retriever:
        """The retriever over the memory's index; every loaded checkpoint is checked against it
        (a swapped memory's index is new to every checkpoint: its encoder was checked instead)."""
        if "retriever" not in self.shared:
            retriever = Retriever(self.memory_at, self.rule, self.device)
            for role, rec in self.records.items():
                if self.memory_root is None:
                    check_index(role, rec, retriever.index.digest)
            self.shared["retriever"] = retriever
        return self.shared["retriever"]

    @property
    def captions(self) -> Mapping[str, str]:
        """Memory key -> caption text (pages, the report, the retrieval baseline): read from the
        index's mapped memory store, one caption per lookup, never the whole memory."""
        if "captions" not in self.shared:
            store = self.retriever.index.store
            self.shared["captions"] = (store.caption_map() if store is not None
                                       else memory_captions(self.memory_at))
        return self.shared["captions"]

    def all_captions(self) -> dict[str, str]:
        """Every memory caption as a dict: demo-scale tools that scan the memory by entity
        (the oracle control, few-shot classification), never evaluation's hot path."""
        if "all_captions" not in self.shared:
            self.shared["all_captions"] = memory_captions(self.memory_at)
        return self.shared["all_captions"]

    def use(self, role: str) -> Inference:
        """The same set-up prompting another loaded model (retriever and captions shared)."""
        return replace(self, role=role)

    # ------------------------------------------------------------------ conversions

    def encode_caption(self, text: str) -> list[int]:
        return self.tok.text.encode(text)[: int(self.tok_cfg.max_caption_tokens)]

    def decode_caption(self, ids: list[int]) -> str:
        return self.tok.text.decode(ids)

    def encode_images(self, images: list[Image.Image]) -> list[list[int]]:
        """PIL images -> raw VQGAN codes (row-major grid), resized as the tokenizer resizes."""
        arr = np.stack([at_size(im, self.image_size) for im in images])
        return self.tok.vqgan.encode(to_tensor(arr)).flatten(1).tolist()

    def decode_codes(self, codes: np.ndarray | list[list[int]]) -> list[Image.Image]:
        """(B, g*g) raw codes -> PIL images through the VQGAN decoder."""
        return decode_codes(self.tok.vqgan, codes, self.grid)

    def document(self, caption: str, image: Image.Image | None) -> np.ndarray:
        """A user's (caption, image) as an in-context document."""
        codes = self.encode_images([image])[0] if image is not None else []
        return np.asarray(self.vocab.encode(self.encode_caption(caption), codes), dtype=np.int64)

    def memory_doc(self, key: str) -> np.ndarray:
        if key not in self.memory:
            raise KeyError(f"no document {key!r} in the token shards (see `racm3 inspect "
                           f"\"select key, caption from tokenize\"`)")
        return self.memory[key]

    def parts(self, doc: np.ndarray) -> tuple[str, Image.Image | None]:
        """(caption text, image) of an encoded document, for display."""
        cap, codes = self.vocab.decode(list(doc))
        return self.decode_caption(cap), (self.decode_codes([codes])[0] if codes else None)

    def memory_image(self, key: str) -> Image.Image | None:
        """A memory document's image, decoded from its tokens (None when it has none)."""
        if key not in self.memory:
            return None
        _, codes = self.vocab.decode(self.memory[key].tolist())
        return self.decode_codes([codes])[0] if codes else None

    # ------------------------------------------------------------------ retrieval (prompt only)

    def retrieve_by_caption(self, caption: str, k: int) -> list[str]:
        """Memory keys retrieved with the caption alone (caption -> image: no leakage)."""
        return self.retriever.by_text([caption], k=k)[0][0] if k else []

    def retrieve_by_image(self, image: Image.Image, k: int) -> list[str]:
        """Memory keys retrieved with the image alone (image -> caption: no leakage)."""
        return self.retriever.by_image([image], k=k)[0][0] if k else []


def load_inference(root: DataRoot, checkpoints: Mapping[str, str] | tuple[str, ...] = ("ra-cm3",),
                   device: str = "cpu", rule: SearchRule | None = None,
                   encoder: str = "", memory: str = "") -> Inference:
    """Tokenizers, memory and trained checkpoints (role -> train/<name>.pt, or names that are
    their own roles; the first is active). `rule`: the redundancy rule at inference (default:
    `inference_rule(root)`, the retrieve stage's); `encoder`: the embed.model the caller expects
    of the index (refused when it differs); `memory`: another data root whose memory is used
    ("" = this root's; refused unless its encoder, codebook and text tokenizer are this root's).
    A checkpoint of another codebook, text tokenizer, vocabulary or (on first retrieval) index
    is refused."""
    names = dict(checkpoints) if isinstance(checkpoints, Mapping) else {c: c for c in checkpoints}
    dev = resolve_device(device)
    tok_cfg = config_of(root, "tokenize")
    tok = load_tokenizers(root, tok_cfg)
    mem_root = open_memory(root, memory)
    if mem_root is not root:
        check_memory(mem_root, {"encoder": fingerprints(root)["encoder"], "codebook": tok.codebook,
                                "text_tokenizer": tok.text_fp})
    vocab, memory_docs, mem_lineage = load_tokens(mem_root)
    models: dict[str, Transformer] = {}
    records: dict[str, dict[str, Any]] = {}
    for role, name in names.items():
        model, v, rec = load_trained(root, name, dev)
        check_checkpoint(role, rec, v, tok, vocab, mem_lineage)
        models[role], records[role] = model, rec
    log.info("inference: %s, %d memory documents from %s, grid %d", ", ".join(names),
             len(memory_docs), mem_root.uri, int(tok_cfg.grid))
    rule = rule or inference_rule(root, encoder=encoder)
    return Inference(root, next(iter(names)), models, records, vocab, tok, tok_cfg, memory_docs,
                     rule, dev, memory_root=None if mem_root is root else mem_root)


def set_threads(n: int) -> None:
    """torch CPU threads for inference (0 = leave torch's default)."""
    if n > 0:
        torch.set_num_threads(n)
