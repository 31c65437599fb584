"""Text and image perplexity of a trained decoder, with or without documents in context.

No leakage (the paper's §3.4; README, "Results a researcher can trust"): image perplexity is scored with documents retrieved by the caption,
caption perplexity with documents retrieved by the image; the caller supplies both lists
(`pipelines.evaluation.perplexity` builds them for held-out documents).

Forms: image perplexity scores the image tokens of `<img alt="caption" src="image">` (caption
first, as generation conditions on it). Caption perplexity defaults to the CM3 infilling form
`<img alt="<mask:0>" src="image"> <infill> <mask:0> caption <eos>` (image first, as image->caption
generation uses it), so every model sees the image before the caption: with the caption first,
vanilla saw nothing before it while RA-CM3 saw documents retrieved by the image, which measured
access to the image, not captioning. The same caption tokens are scored in both forms.
Logits are computed only at the scored positions (never over the whole prompt and vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from model.cm3.format import caption_infilling_form
from model.document import Vocab, sequence_positions
from model.transformer import Transformer

TEXT, IMAGE = 1, 2
FORMS = ("infill", "first")  # caption perplexity: image first (infilling), or caption first


@dataclass
class HeldOutExample:
    """One held-out main document and the documents retrieved for scoring each of its parts."""

    main: Sequence[int]  # encoded document ids (Vocab.encode)
    by_caption: list[Sequence[int]] = field(default_factory=list)  # retrieved with the caption
    by_image: list[Sequence[int]] = field(default_factory=list)  # retrieved with the image


def selected_logits(model: Transformer, ids: torch.Tensor, pos: torch.Tensor,
                    at: torch.Tensor) -> torch.Tensor:
    """Logits (B, len(at), V) at positions `at` only: the head runs on those hidden states alone
    (never mutates the model: shards may share it across threads)."""
    hidden, _ = model.hidden(ids, pos)  # (B, T, C) final normed states
    return model.head(hidden[:, at])


def scored_nll(model: Transformer, docs: list[Sequence[int]], vocab: Vocab,
               modality: int) -> tuple[float, int]:
    """Summed NLL of the last document's tokens of one modality, given the documents before it."""
    ids = torch.tensor(np.concatenate([np.asarray(d) for d in docs]), dtype=torch.long)[None]
    pos = torch.tensor(sequence_positions(docs))[None]
    start = len(ids[0]) - len(docs[-1])
    sel = np.zeros(len(ids[0]), dtype=bool)
    sel[start:] = vocab.modality(np.asarray(docs[-1])) == modality
    targets = np.flatnonzero(sel[1:]) + 1  # scored tokens (never the first of the sequence)
    if not len(targets):
        return 0.0, 0
    device = next(model.parameters()).device
    at = torch.from_numpy(targets - 1).to(device)  # the positions whose logits predict them
    logits = selected_logits(model, ids[:, :-1].to(device), pos[:, :-1].to(device), at)[0]
    nll = F.cross_entropy(logits.float(), ids[0, targets].to(device), reduction="sum")
    return float(nll), len(targets)


def example_nll(model: Transformer, vocab: Vocab, ex: HeldOutExample, with_retrieval: bool,
                k: int, text_form: str = "infill") -> dict[str, tuple[float, int]]:
    """{"image": (summed NLL, tokens), "text": (...)} of one held-out example."""
    if text_form not in FORMS:
        raise ValueError(f"text_form must be one of {FORMS}, got {text_form!r}")
    out = {}
    for name, modality, retrieved in (("image", IMAGE, ex.by_caption), ("text", TEXT, ex.by_image)):
        context = list(retrieved[:k]) if with_retrieval else []
        main = caption_infilling_form(vocab, ex.main) if name == "text" and text_form == "infill" else ex.main
        out[name] = scored_nll(model, [*context, main], vocab, modality)
    return out


@torch.no_grad()
def heldout_perplexity(model: Transformer, vocab: Vocab, examples: Sequence[HeldOutExample],
                       with_retrieval: bool = True, k: int = 2,
                       text_form: str = "infill") -> dict[str, float]:
    """{"image_ppl", "text_ppl", "image_tokens", "text_tokens"} over the examples.

    With retrieval, up to k retrieved documents precede the main one, as in training (m1..mK, x).
    Image ppl: caption first; text ppl: `text_form` ("infill": image first, the default; "first").
    """
    model.eval()
    totals = {"image": [0.0, 0], "text": [0.0, 0]}
    for ex in examples:
        for name, (nll, n) in example_nll(model, vocab, ex, with_retrieval, k, text_form).items():
            totals[name][0] += nll
            totals[name][1] += n
    (i_nll, i_n), (t_nll, t_n) = totals["image"], totals["text"]
    return {"image_ppl": math.exp(i_nll / max(i_n, 1)), "text_ppl": math.exp(t_nll / max(t_n, 1)),
            "image_tokens": i_n, "text_tokens": t_n}
