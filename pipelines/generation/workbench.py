"""Everything generation reads from a data root: a trained decoder, its tokenizers, the memory's
documents and (lazily) the retriever; conversions between images, captions, codes and documents."""

from __future__ import annotations

import logging
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
from pipelines.retrieval.search import Retriever
from pipelines.tokens.tokenizers import Tokenizers, load_tokenizers
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import LineageError, load_tokens
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table

log = logging.getLogger(__name__)


@dataclass
class Workbench:
    """A trained variant with its tokenizers and memory, ready to prompt."""

    root: DataRoot
    variant: str
    model: Transformer
    vocab: Vocab
    tok: Tokenizers
    tok_cfg: Any  # the tokenize section the memory's tokens were made with
    memory: dict[str, np.ndarray]  # key -> encoded document ids
    device: str = "cpu"
    models: dict[str, Transformer] = field(default_factory=dict)  # every loaded variant
    # Loaded on first use and shared by every `use(variant)` copy (one CLIP and index, not one per call).
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return int(self.tok_cfg.grid)

    @property
    def image_size(self) -> int:
        return int(self.tok_cfg.image_size)

    @property
    def retriever(self) -> Retriever:
        if "retriever" not in self.shared:
            cfg = config_of(self.root, "retrieve", missing_ok=True)
            self.shared["retriever"] = Retriever(self.root, replace(cfg, use_gpu=False), self.device)
        return self.shared["retriever"]

    @property
    def captions(self) -> dict[str, str]:
        """Memory key -> caption text (for pages and for choosing demonstrations)."""
        if "captions" not in self.shared:
            self.shared["captions"] = self._read_captions()
        return self.shared["captions"]

    def _read_captions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for m in list_manifests(self.root, "tokenize"):
            t = read_table(self.root, self.root.artifact("tokenize", m.shard_id, "parquet"),
                           ["key", "caption"])
            out.update(zip(t["key"].to_pylist(), (c or "" for c in t["caption"].to_pylist()),
                           strict=True))
        return out

    def use(self, variant: str) -> Workbench:
        """The same workbench prompting another loaded variant (its retriever and captions shared)."""
        return replace(self, variant=variant, model=self.models[variant])

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
        g = self.grid
        images = self.tok.vqgan.decode(torch.as_tensor(np.asarray(codes), dtype=torch.long).view(-1, g, g))
        arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

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

    # ------------------------------------------------------------------ retrieval (prompt only)

    def retrieve_by_caption(self, caption: str, k: int) -> list[str]:
        """Memory keys retrieved with the caption alone (caption -> image: no leakage)."""
        return self.retriever.by_text([caption], k=k)[0][0] if k else []

    def retrieve_by_image(self, image: Image.Image, k: int) -> list[str]:
        """Memory keys retrieved with the image alone (image -> caption: no leakage)."""
        return self.retriever.by_image([image], k=k)[0][0] if k else []


def at_size(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8, resized as `model.images.load_image` resizes the training images."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def load_workbench(root: DataRoot, variants: tuple[str, ...] = ("ra-cm3",),
                   device: str = "cpu") -> Workbench:
    """Tokenizers, memory and the trained variants of a data root; the first variant is active.
    A checkpoint trained on another codebook or text tokenizer is refused."""
    dev = resolve_device(device)
    tok_cfg = config_of(root, "tokenize")
    tok = load_tokenizers(root, tok_cfg)
    vocab, memory, lineage = load_tokens(root)
    models: dict[str, Transformer] = {}
    for variant in variants:
        model, v, rec = load_trained(root, variant, dev)
        got = rec.get("lineage", {})
        for name, want in (("codebook", tok.codebook), ("text_tokenizer", tok.text_fp)):
            if got.get(name) not in (None, want):
                raise LineageError(f"the {variant} checkpoint was trained with {name} "
                                   f"{got.get(name)!r}, the tokenizers have {want!r}: re-run train")
        if v != vocab:
            raise LineageError(f"the {variant} checkpoint's vocabulary {v} differs from the token "
                               f"shards' {vocab}: re-run tokenize and train together")
        models[variant] = model
    log.info("workbench: %s, %d memory documents, grid %d", ", ".join(variants), len(memory),
             int(tok_cfg.grid))
    first = variants[0]
    return Workbench(root, first, models[first], vocab, tok, tok_cfg, memory, dev, models)
