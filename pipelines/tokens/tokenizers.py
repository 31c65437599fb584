"""The document tokenizers (VQGAN image codes + caption BPE) as configured by the tokenize section.

Shared by the tokenize stage, `racm3 decode` and evaluation (which encodes its prompts the same way).
`cfg` arguments are the tokenize section (`TokenizeConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.document import Vocab
from model.text_tokenizer import TextTokenizer, load_text_tokenizer
from model.vq.checks import CheckpointError, Expect
from model.vq.registry import load
from model.vq.taming import beside
from model.vqgan import PRESETS, VQGAN, state_fingerprint
from pipelines.core.config import ConfigError
from storage.fs import DataRoot
from storage.schemas import BPE_SHARD, BPE_SUFFIX, VQGAN_SHARD, VQGAN_SUFFIX


@dataclass
class Tokenizers:
    """Per-worker resources: the VQGAN, the text tokenizer and their fingerprints."""

    vqgan: VQGAN
    text: TextTokenizer
    codebook: str
    text_fp: str

    def vocab(self) -> Vocab:
        return Vocab(n_text=self.text.vocab_size, n_image=self.vqgan.cfg.n_embed)



def checkpoint_path(root: DataRoot, cfg: Any) -> str:
    return cfg.checkpoint or root.artifact("fit-vqgan", VQGAN_SHARD, VQGAN_SUFFIX)



def text_tokenizer_spec(root: DataRoot, cfg: Any) -> str:
    return cfg.text_tokenizer or root.artifact("fit-vqgan", BPE_SHARD, BPE_SUFFIX)



def vqgan_config_path(cfg: Any) -> str | None:
    """The architecture yaml: tokenize.vqgan_config, else `<checkpoint>.yaml` beside a local checkpoint."""
    return cfg.vqgan_config or (beside(cfg.checkpoint) if cfg.checkpoint else None)


def load_vqgan(root: DataRoot, cfg: Any) -> VQGAN:
    """The configured tokenizer (any family in model.vq.registry); the architecture comes from the
    checkpoint's own config, tokenize.arch only as a fallback. A codebook size, factor or
    resolution other than the config's is refused naming the field (ConfigError: exit 2)."""
    expect = Expect(n_embed=cfg.codebook_size, factor=cfg.factor, resolution=cfg.image_size)
    path = cfg.checkpoint or root.local_copy(checkpoint_path(root, cfg))  # the fitted one may be remote
    try:
        return load(path, cfg.vqgan_config or None, PRESETS[cfg.arch], expect, cfg.allow_pickle)
    except CheckpointError as e:
        raise ConfigError(f"tokenize.{e.field}", str(e)) from e



def load_tokenizers(root: DataRoot, cfg: Any) -> Tokenizers:
    """Everything needed to turn documents into ids; also used by evaluate to encode prompts."""
    torch.set_num_threads(cfg.threads)
    vqgan = load_vqgan(root, cfg)
    spec = text_tokenizer_spec(root, cfg)
    text = load_text_tokenizer(root.local_copy(spec) if root.exists(spec) else spec)
    return Tokenizers(vqgan, text, state_fingerprint(vqgan), text.fingerprint())
