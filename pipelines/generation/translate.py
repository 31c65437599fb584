"""Caption -> image and image -> caption with a workbench, reranked as the paper does (§4.2):
N sampled images ordered by CLIP score with the caption, M sampled captions by perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipelines.inference.guidance import Guidance, guided_images
from pipelines.inference.loader import Inference
from pipelines.inference.sampling import Sampling, caption_nll, generate_captions


@dataclass
class Context:
    """In-context documents and where each came from (a memory key or `user`)."""

    docs: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @classmethod
    def of_keys(cls, bench: Inference, keys: Sequence[str]) -> Context:
        return cls([bench.memory_doc(k) for k in keys], list(keys))

    def __add__(self, other: Context) -> Context:
        return Context(self.docs + other.docs, self.sources + other.sources)


@dataclass
class Ranked:
    """Outputs best first with their scores (CLIP score: higher better; NLL: lower better)."""

    images: list[Image.Image] = field(default_factory=list)
    codes: list[list[int]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    score_name: str = ""


def clip_scores(bench: Inference, images: list[Image.Image], caption: str) -> np.ndarray:
    """(N,) cosine similarity of each image with the caption, by the index's CLIP encoder."""
    enc = bench.retriever.encoder
    return enc.encode_image(images) @ enc.encode_text([caption])[0]


def rank_images(bench: Inference, codes: np.ndarray, caption: str) -> Ranked:
    images = bench.decode_codes(codes)
    scores = clip_scores(bench, images, caption)
    order = np.argsort(-scores, kind="stable")
    return Ranked(images=[images[i] for i in order], codes=[codes[i].tolist() for i in order],
                  scores=[float(scores[i]) for i in order], score_name="CLIP score")


def caption_to_image(bench: Inference, caption: str, context: Context, n: int,
                     params: Sampling, guidance: Guidance = Guidance(),
                     generator: torch.Generator | None = None) -> Ranked:
    """n images for the caption, best CLIP score first."""
    codes = guided_images(bench.model, bench.vocab, bench.encode_caption(caption), bench.grid, n,
                          context.docs, guidance, params, generator)
    return rank_images(bench, codes, caption)


def image_to_caption(bench: Inference, image: Image.Image, context: Context, m: int,
                     max_tokens: int, params: Sampling,
                     generator: torch.Generator | None = None, min_tokens: int = 1) -> Ranked:
    """m captions for the image (CM3 infilling prompt), lowest perplexity first."""
    codes = bench.encode_images([image])[0]
    caps = generate_captions(bench.model, bench.vocab, codes, m, max_tokens, context.docs, params,
                             generator, min_tokens)
    nll = caption_nll(bench.model, bench.vocab, codes, caps, context.docs)
    order = np.argsort(nll, kind="stable")
    return Ranked(captions=[bench.decode_caption(caps[i]) for i in order],
                  scores=[float(math.exp(nll[i])) if math.isfinite(nll[i]) else math.inf
                          for i in order], score_name="perplexity")
