"""Held-out text and image perplexity of a trained decoder, with or without retrieved documents.

No leakage (DESIGN.md): image perplexity is scored with documents retrieved by the caption,
caption perplexity with documents retrieved by the image; the caller supplies both lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from model.document import Vocab, sequence_positions
from model.transformer import Transformer
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import Corpus, load_corpus
from storage.fs import DataRoot

TEXT, IMAGE = 1, 2


@dataclass
class HeldOutExample:
    """One held-out main document and the documents retrieved for scoring each of its parts."""

    main: Sequence[int]  # encoded document ids (Vocab.encode)
    by_caption: list[Sequence[int]] = field(default_factory=list)  # retrieved with the caption
    by_image: list[Sequence[int]] = field(default_factory=list)  # retrieved with the image


def scored_nll(model: Transformer, docs: list[Sequence[int]], vocab: Vocab,
               modality: int) -> tuple[float, int]:
    """Summed NLL of the last document's tokens of one modality, given the documents before it."""
    ids = torch.tensor(np.concatenate([np.asarray(d) for d in docs]), dtype=torch.long)[None]
    pos = torch.tensor(sequence_positions(docs))[None]
    device = next(model.parameters()).device
    logits, _ = model(ids[:, :-1].to(device), pos[:, :-1].to(device))  # (1, T-1, V)
    nll = F.cross_entropy(logits[0].float(), ids[0, 1:].to(device), reduction="none")  # (T-1,)
    start = len(ids[0]) - len(docs[-1])
    sel = np.zeros(len(ids[0]), dtype=bool)
    sel[start:] = vocab.modality(np.asarray(docs[-1])) == modality
    sel_t = torch.from_numpy(sel[1:]).to(device)
    return float(nll[sel_t].sum()), int(sel_t.sum())


@torch.no_grad()
def heldout_perplexity(model: Transformer, vocab: Vocab, examples: Sequence[HeldOutExample],
                       with_retrieval: bool = True, k: int = 2) -> dict[str, float]:
    """{"image_ppl", "text_ppl", "image_tokens", "text_tokens"} over the examples.

    With retrieval, up to k retrieved documents precede the main one, as in training (m1..mK, x).
    """
    model.eval()
    totals = {IMAGE: [0.0, 0], TEXT: [0.0, 0]}
    for ex in examples:
        for modality, retrieved in ((IMAGE, ex.by_caption), (TEXT, ex.by_image)):
            context = list(retrieved[:k]) if with_retrieval else []
            nll, n = scored_nll(model, [*context, ex.main], vocab, modality)
            totals[modality][0] += nll
            totals[modality][1] += n
    (i_nll, i_n), (t_nll, t_n) = totals[IMAGE], totals[TEXT]
    return {"image_ppl": math.exp(i_nll / max(i_n, 1)), "text_ppl": math.exp(t_nll / max(t_n, 1)),
            "image_tokens": i_n, "text_tokens": t_n}


def heldout_examples(corpus: Corpus, limit: int | None = None) -> list[HeldOutExample]:
    """Held-out documents of a corpus with their full-query neighbours: retrieved by the caption
    for image perplexity, by the image for caption perplexity (neighbours without tokens skipped)."""
    out = []
    for key in sorted(corpus.held_out)[:limit]:
        lists = corpus.neighbours.get(key, {})

        def docs(query: str, key: str = key, lists: dict = lists) -> list[Sequence[int]]:
            return [list(corpus.docs[n]) for n in lists.get((query, 0), []) if n in corpus.docs and n != key]

        out.append(HeldOutExample(list(corpus.docs[key]), by_caption=docs("text"), by_image=docs("image")))
    return out


def compare_variants(root: DataRoot, limit: int | None = None, k: int = 2,
                     device: str = "cpu") -> dict[str, dict[str, float]]:
    """Held-out perplexity of RA-CM3 (with and without retrieval) and vanilla CM3, both trained
    by the `train` stage with the same `holdout_fraction` (the demo's RA-CM3 vs vanilla check)."""
    ra, vocab, ra_rec = load_trained(root, "ra-cm3", device)
    vanilla, vocab_v, v_rec = load_trained(root, "vanilla", device)
    frac = ra_rec["train"]["holdout_fraction"]
    if frac <= 0 or v_rec["train"]["holdout_fraction"] != frac or vocab != vocab_v:
        raise ValueError("compare_variants needs both variants trained on the same tokens with the "
                         "same train.holdout_fraction > 0; re-run `racm3 run train` for both")
    corpus = load_corpus(root, with_neighbours=True, holdout_fraction=frac)
    examples = heldout_examples(corpus, limit)
    return {"ra-cm3 (retrieval)": heldout_perplexity(ra, vocab, examples, True, k),
            "ra-cm3 (no retrieval)": heldout_perplexity(ra, vocab, examples, False, k),
            "vanilla": heldout_perplexity(vanilla, vocab, examples, False, k),
            "examples": {"n": len(examples)}}
