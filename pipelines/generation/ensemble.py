"""Ensembles over retrieved documents at inference (paper §4.1, Appendix D.3, Table 6): more
documents than fit in one context, as several passes over different retrieved subsets whose
next-token distributions are combined.

`passes(retrieved, k, per_pass)` splits the top k into consecutive subsets of per_pass (K=4 with 2
per pass: [r1, r2], [r3, r4]). `mode="prob"` averages the passes' probabilities (the paper's
ensemble, §5.4, a proper mixture); `mode="logprob"` averages their log-probabilities and
renormalises (a product of experts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.cm3.format import Doc, text_to_image_prompt
from model.document import Vocab, sequence_positions
from model.sampling import mixture, sample_branches
from model.transformer import Transformer
from pipelines.inference.sampling import Sampling

TEXT, IMAGE = 1, 2  # Vocab.modality codes
MODES = ("prob", "logprob")


def passes(retrieved: Sequence[Doc], k: int, per_pass: int = 2) -> list[list[Doc]]:
    """The top k retrieved documents as consecutive subsets of per_pass (one empty pass if k=0)."""
    if per_pass < 1:
        raise ValueError(f"per_pass must be >= 1, got {per_pass}")
    top = list(retrieved[:k])
    return [top[i:i + per_pass] for i in range(0, len(top), per_pass)] or [[]]


def combine(logp: torch.Tensor, mode: str) -> torch.Tensor:
    """(P, T, V) per-pass log-probs -> (T, V) ensemble log-probs."""
    if mode == "prob":
        return mixture(logp)
    if mode == "logprob":
        return logp.mean(0).log_softmax(-1)
    raise ValueError(f"ensemble mode must be one of {MODES}, got {mode!r}")


@torch.no_grad()
def main_logprobs(model: Transformer, context: Sequence[Doc], main: Doc) -> torch.Tensor:
    """(len(main) - 1, V) log-probs predicting main's tokens 1.. given the context documents."""
    docs = [np.asarray(d, dtype=np.int64) for d in context] + [np.asarray(main, dtype=np.int64)]
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.concatenate(docs))[None].to(device)
    pos = torch.from_numpy(sequence_positions(docs))[None].to(device)
    logits, _ = model(ids[:, :-1], pos[:, :-1])  # (1, T-1, V)
    return logits[0, -(len(docs[-1]) - 1):].float().log_softmax(-1)


@torch.no_grad()
def ensemble_nll(model: Transformer, vocab: Vocab, main: Doc, retrieved: Sequence[Doc], k: int,
                 per_pass: int = 2, modality: int = IMAGE, mode: str = "prob") -> tuple[float, int]:
    """(summed NLL, tokens) of `main`'s tokens of one modality (IMAGE=2 / TEXT=1), given its top
    k retrieved documents in passes of per_pass, combined by `mode`.

    The drop-in for `pipelines.evaluation.perplexity.scored_nll` at K > per_pass (Table 6):
    `ensemble_nll(model, vocab, ex.main, ex.by_caption, K)` for image perplexity with K
    documents retrieved by the caption, `modality=TEXT` with `ex.by_image` for caption
    perplexity. With k <= per_pass it is one pass and equals `scored_nll` of
    `[*retrieved[:k], main]`.
    """
    main_ids = np.asarray(main, dtype=np.int64)
    logp = torch.stack([main_logprobs(model, ctx, main_ids) for ctx in passes(retrieved, k, per_pass)])
    mixed = combine(logp, mode)  # (len(main) - 1, V)
    target = torch.from_numpy(main_ids[1:]).to(mixed.device)
    nll = F.nll_loss(mixed, target, reduction="none")  # (len(main) - 1,)
    sel = torch.from_numpy(vocab.modality(main_ids[1:]) == modality).to(mixed.device)
    return float(nll[sel].sum()), int(sel.sum())


def ensemble_perplexity(model: Transformer, vocab: Vocab, mains: Sequence[Doc],
                        retrieved: Sequence[Sequence[Doc]], k: int, per_pass: int = 2,
                        modality: int = IMAGE, mode: str = "prob") -> float:
    """exp(mean NLL) over documents; retrieved[i] are main i's documents, best first."""
    total, n = 0.0, 0
    for main, docs in zip(mains, retrieved, strict=True):
        s, c = ensemble_nll(model, vocab, main, docs, k, per_pass, modality, mode)
        total, n = total + s, n + c
    return math.exp(total / max(n, 1))


def ensemble_images(model: Transformer, vocab: Vocab, caption_ids: Sequence[int], grid: int,
                    n: int, retrieved: Sequence[Doc], k: int, per_pass: int = 2,
                    params: Sampling = Sampling(),
                    generator: torch.Generator | None = None) -> np.ndarray:
    """(n, grid*grid) raw codes sampled from the mixture of the passes' next-token
    distributions (all passes in one batch)."""
    branches = [text_to_image_prompt(vocab, caption_ids, ctx)
                for ctx in passes(retrieved, k, per_pass)]
    out = sample_branches(model, branches, mixture, n, grid * grid, params.temperature,
                          params.top_k, params.top_p,
                          allowed=range(vocab.image_offset, vocab.size), generator=generator)
    return (out.cpu().numpy() - vocab.image_offset).astype(np.int64)
