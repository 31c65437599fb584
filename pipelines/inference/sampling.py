"""Sampling and caption scoring with retrieved (or user-given) documents in context (paper §3.1,
§4.2): text->image continues `model.cm3.format.text_to_image_prompt` with grid*grid image codes;
image->text continues `image_to_text_prompt` (the CM3 infilling form with the caption masked).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.cm3.format import Doc, image_to_text_prompt, text_to_image_prompt
from model.document import EOS, IMG_CLOSE, PAD, Vocab
from model.sampling import sample
from model.transformer import Transformer


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters for one modality."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely ids (0 = all)
    top_p: float = 1.0  # nucleus mass (1 = all)


def _batch(ids: list[int], positions: list[int], n: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(ids, dtype=torch.long, device=device)[None].expand(n, -1)  # (n, T)
    p = torch.tensor(positions, dtype=torch.long, device=device)[None].expand(n, -1)  # (n, T)
    return t.contiguous(), p.contiguous()


def generate_images(model: Transformer, vocab: Vocab, caption_ids: Sequence[int], grid: int,
                    n: int, context: Sequence[Doc] = (), params: Sampling = Sampling(),
                    generator: torch.Generator | None = None) -> np.ndarray:
    """(n, grid*grid) raw codebook indices sampled for one caption (only image ids are allowed,
    exactly grid*grid of them; `">` closes the document afterwards)."""
    ids, pos = text_to_image_prompt(vocab, caption_ids, context)
    device = next(model.parameters()).device
    prompt, positions = _batch(ids, pos, n, device)
    allowed = range(vocab.image_offset, vocab.size)
    out = sample(model, prompt, positions, grid * grid, params.temperature, params.top_k,
                 params.top_p, allowed=allowed, generator=generator)  # (n, grid*grid)
    return (out.cpu().numpy() - vocab.image_offset).astype(np.int64)


def generate_captions(model: Transformer, vocab: Vocab, image_codes: Sequence[int], m: int,
                      max_tokens: int, context: Sequence[Doc] = (),
                      params: Sampling = Sampling(),
                      generator: torch.Generator | None = None,
                      min_tokens: int = 0) -> list[list[int]]:
    """m sampled captions (raw text ids, cut at <eos>, at least min_tokens long) for one image,
    via the infilling prompt."""
    ids, pos = image_to_text_prompt(vocab, image_codes, context)
    device = next(model.parameters()).device
    prompt, positions = _batch(ids, pos, m, device)
    allowed = [EOS, *range(vocab.text_offset, vocab.image_offset)]
    out = sample(model, prompt, positions, max_tokens, params.temperature, params.top_k,
                 params.top_p, allowed=allowed, stop=EOS, generator=generator,
                 min_new=min_tokens)  # (m, <= max_tokens)
    caps = []
    for row in out.cpu().tolist():
        row = row[: row.index(EOS)] if EOS in row else row
        caps.append([x - vocab.text_offset for x in row])
    return caps


@torch.no_grad()
def caption_nll(model: Transformer, vocab: Vocab, image_codes: Sequence[int],
                captions: Sequence[Doc],
                context: Sequence[Doc] = ()) -> list[float]:
    """Mean NLL per token of each caption (its <eos> included) in the infilling prompt; the
    reranking score of image->text (lowest = lowest perplexity). An empty caption gets inf."""
    ids, pos = image_to_text_prompt(vocab, image_codes, context)
    tails = [[int(c) + vocab.text_offset for c in cap] + [EOS] for cap in captions]
    width = max(map(len, tails))
    rows = [ids + t + [PAD] * (width - len(t)) for t in tails]  # right padding: causal, harmless
    prow = pos + list(range(pos[-1] + 1, pos[-1] + 1 + width))
    device = next(model.parameters()).device
    x = torch.tensor(rows, device=device)  # (M, T)
    p = torch.tensor([prow] * len(rows), device=device)  # (M, T)
    # the head runs only where a caption token is predicted (never over the whole prompt)
    at = torch.arange(len(ids) - 1, len(ids) - 1 + width, device=device)
    hidden, _ = model.hidden(x[:, :-1], p[:, :-1])  # (M, T-1, C)
    logits = model.head(hidden[:, at])  # (M, width, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, len(ids):], reduction="none")
    return [math.inf if len(t) == 1 else float(nll[r, :len(t)].mean()) for r, t in enumerate(tails)]


def close_image(vocab: Vocab, caption_ids: Sequence[int], codes: Sequence[int]) -> list[int]:
    """The whole generated document (caption + sampled codes + `">` <eos>), e.g. to use as an
    in-context document for a next generation."""
    doc = vocab.encode(caption_ids, codes)
    assert doc[-2] == IMG_CLOSE
    return doc
