"""One/few-shot image classification by in-context learning (paper §5.4, Fig 8).

A label is scored by the model's likelihood of its caption completing the query image (CM3's
infilling prompt with the caption masked, the demonstrations before it). k-shot = k passes, each
with a different set of demonstrations (one per class), their label probabilities averaged: the
paper's ensemble, shorter than putting all k sets in one context and agnostic to their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.cm3.format import Doc
from model.document import Vocab
from model.transformer import Transformer
from pipelines.inference.sampling import caption_nll


def label_logprobs(model: Transformer, vocab: Vocab, query_codes: Sequence[int],
                   labels: Sequence[Sequence[int]], demos: Sequence[Doc] = ()) -> np.ndarray:
    """(L,) summed log-probability of each label caption (its <eos> included) given the demos
    and the query image."""
    nll = caption_nll(model, vocab, query_codes, [list(lab) for lab in labels], demos)
    return -np.asarray(nll) * np.asarray([len(lab) + 1 for lab in labels])


@torch.no_grad()
def pass_probs(model: Transformer, vocab: Vocab, query_codes: Sequence[int],
               labels: Sequence[Sequence[int]], passes: Sequence[Sequence[Doc]]) -> np.ndarray:
    """(P, L) label probabilities of each pass (softmax over the labels' log-probabilities)."""
    rows = []
    for demos in passes or [()]:
        lp = label_logprobs(model, vocab, query_codes, labels, demos)
        rows.append(np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum())
    return np.stack(rows)


def ensemble(probs: np.ndarray, k: int) -> np.ndarray:
    """(L,) mean of the first max(k, 1) passes' label probabilities (k = 0: the no-demo pass)."""
    return probs[: max(k, 1)].mean(axis=0)


def classify(model: Transformer, vocab: Vocab, query_codes: Sequence[int],
             labels: Sequence[Sequence[int]], passes: Sequence[Sequence[Doc]]) -> int:
    """Index of the most probable label, averaged over the passes (none: zero-shot)."""
    probs = pass_probs(model, vocab, query_codes, labels, passes)
    return int(np.argmax(ensemble(probs, len(passes))))
