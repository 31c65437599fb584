"""Held-out perplexity of the trained variants: the held-out documents of the token store with
their neighbours, scored by `pipelines.inference.scoring`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipelines.inference.scoring import HeldOutExample, heldout_perplexity
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import DocSource
from pipelines.training.token_store import open_store
from storage.fs import DataRoot


def heldout_examples(corpus: DocSource, limit: int | None = None) -> list[HeldOutExample]:
    """Held-out documents of a corpus (by key) with their full-query neighbours: retrieved by the
    caption for image perplexity, by the image for caption perplexity (neighbours without tokens
    skipped)."""
    held = sorted((corpus.label(h), h) for h in map(corpus.item, range(corpus.n_items()))
                  if corpus.is_held(h))
    out = []
    for _, h in held[:limit]:
        lists = corpus.neighbour_lists(h) or {}

        def docs(query: str, h: Any = h, lists: dict = lists) -> list[Sequence[int]]:
            return [list(corpus.doc(n)) for n in lists.get((query, 0), [])
                    if corpus.has_doc(n) and n != h]

        out.append(HeldOutExample(list(corpus.doc(h)), by_caption=docs("text"), by_image=docs("image")))
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
    corpus = open_store(root, with_neighbours=True, holdout_fraction=frac)
    examples = heldout_examples(corpus, limit)
    return {"ra-cm3 (retrieval)": heldout_perplexity(ra, vocab, examples, True, k),
            "ra-cm3 (no retrieval)": heldout_perplexity(ra, vocab, examples, False, k),
            "vanilla": heldout_perplexity(vanilla, vocab, examples, False, k),
            "examples": {"n": len(examples)}}
