"""Classifier-free guidance for caption -> image (beyond the paper: CM3Leon, Chameleon, Re-Imagen).

Branch 0 is the full prompt (retrieved documents + caption). Caption guidance adds a branch with
the caption dropped (`<img alt="" src="`), document guidance one with the retrieved documents
dropped; their weights are separate (Re-Imagen's text vs neighbour guidance). All branches share
one batch (`model.sampling.sample_guided`). Weights 0 sample the unguided model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.cm3.format import Doc, text_to_image_prompt
from model.document import Vocab
from model.sampling import sample_guided
from model.transformer import Transformer
from pipelines.inference.sampling import Sampling, generate_images


@dataclass(frozen=True)
class Guidance:
    """Guidance weights: 0 = off; l = l_full + caption (l_full - l_no_caption)
    + documents (l_full - l_no_documents)."""

    caption: float = 0.0
    documents: float = 0.0

    @property
    def off(self) -> bool:
        return not self.caption and not self.documents


def guidance_branches(vocab: Vocab, caption_ids: Sequence[int], context: Sequence[Doc],
                      guidance: Guidance) -> tuple[list[tuple[list[int], list[int]]], list[float]]:
    """(prompts, weights): the full prompt, then one prompt per non-zero guidance weight."""
    branches = [text_to_image_prompt(vocab, caption_ids, context)]
    weights: list[float] = []
    if guidance.caption:
        branches.append(text_to_image_prompt(vocab, [], context))
        weights.append(guidance.caption)
    if guidance.documents and len(context):
        branches.append(text_to_image_prompt(vocab, caption_ids, ()))
        weights.append(guidance.documents)
    return branches, weights


def guided_images(model: Transformer, vocab: Vocab, caption_ids: Sequence[int], grid: int, n: int,
                  context: Sequence[Doc] = (), guidance: Guidance = Guidance(),
                  params: Sampling = Sampling(),
                  generator: torch.Generator | None = None) -> np.ndarray:
    """(n, grid*grid) raw codes for one caption, sampled with guidance (plain sampling when off)."""
    branches, weights = guidance_branches(vocab, caption_ids, context, guidance)
    if not weights:
        return generate_images(model, vocab, caption_ids, grid, n, context, params, generator)
    out = sample_guided(model, branches, weights, n, grid * grid, params.temperature,
                        params.top_k, params.top_p, allowed=range(vocab.image_offset, vocab.size),
                        generator=generator)
    return (out.cpu().numpy() - vocab.image_offset).astype(np.int64)
