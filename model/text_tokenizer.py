"""Text tokenizers for captions: open_clip's bundled BPE (paper preset) or a small BPE fitted offline."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

OPENCLIP = "openclip"  # config value naming open_clip's bundled bpe_simple_vocab_16e6.txt.gz
UNK = "<unk>"


class TextTokenizer(Protocol):
    """Caption text <-> raw text ids in [0, vocab_size) (Vocab offsets them into the joint space)."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def fingerprint(self) -> str: ...


class OpenClipTokenizer:
    """open_clip's CLIP BPE (49,408 ids); its sot/eot ids are never emitted, CM3 has its own markers."""

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        self.path = default_bpe()
        self.tok = SimpleTokenizer(self.path)
        self.vocab_size = self.tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids]).strip()

    def fingerprint(self) -> str:
        with open(self.path, "rb") as f:
            return "openclip:" + hashlib.sha256(f.read()).hexdigest()[:16]


class BPETokenizer:
    """A `tokenizers` BPE loaded from its JSON file (lowercased, Metaspace word boundaries)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not os.path.exists(path):
            raise FileNotFoundError(f"text tokenizer {path} does not exist: run `racm3 run fit-vqgan` "
                                    f"(it fits the demo BPE) or set tokenize.text_tokenizer")
        self.path = path
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return "bpe:" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


def load_text_tokenizer(spec: str) -> TextTokenizer:
    """`"openclip"` or the path of a `tokenizers` JSON file."""
    return OpenClipTokenizer() if spec == OPENCLIP else BPETokenizer(spec)


def train_bpe(captions: Iterable[str], vocab_size: int, path: str) -> BPETokenizer:
    """Fit a small BPE on captions and save it as JSON; a vocab of hundreds keeps the demo model small."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK], show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    tok.save(path)
    return BPETokenizer(path)
