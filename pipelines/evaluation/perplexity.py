"""Held-out text and image perplexity of a trained decoder, with or without retrieved documents.

No leakage (DESIGN.md): image perplexity is scored with documents retrieved by the caption,
caption perplexity with documents retrieved by the image; the caller supplies both lists.

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

from model.document import EOS, IMG_CLOSE, IMG_OPEN, IMG_SRC, INFILL, Vocab, sequence_positions
from model.transformer import Transformer
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import Corpus, load_corpus
from storage.fs import DataRoot

TEXT, IMAGE = 1, 2
FORMS = ("infill", "first")  # caption perplexity: image first (infilling), or caption first


@dataclass
class HeldOutExample:
    """One held-out main document and the documents retrieved for scoring each of its parts."""

    main: Sequence[int]  # encoded document ids (Vocab.encode)
    by_caption: list[Sequence[int]] = field(default_factory=list)  # retrieved with the caption
    by_image: list[Sequence[int]] = field(default_factory=list)  # retrieved with the image


def infilling_form(vocab: Vocab, doc: Sequence[int]) -> list[int]:
    """A document with its caption as span 0, in the form `generate.image_to_text_prompt` + the
    caption + <eos> (what `mask_spans(doc, [(0, len(caption))])` trains)."""
    caption, image = vocab.decode(doc)
    m0 = vocab.mask(0)
    return [IMG_OPEN, m0, IMG_SRC, *(c + vocab.image_offset for c in image), IMG_CLOSE, INFILL, m0,
            *(c + vocab.text_offset for c in caption), EOS]


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
        main = infilling_form(vocab, ex.main) if name == "text" and text_form == "infill" else ex.main
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
