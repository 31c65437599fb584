"""The ablation variants as data: Table 5 (relevance, modality, diversity, alpha), Table 6 (K at
inference), Fig 9 (model size) and, beyond the paper, training without the block-diagonal mask,
the oracle control and classifier-free guidance as trained for (caption dropout 0.1, w = 0, 1, 3).

Each row names what it trains (None: it evaluates an existing checkpoint), how it is evaluated,
the paper's (image ppl, text ppl) and the row its direction is judged against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipelines.core.config import ConfigError

FINAL = "ra-cm3"  # the demo's RA-CM3 (train/ra-cm3.pt): Table 5's "final" row
PPL = ("image ppl", "text ppl")


@dataclass(frozen=True)
class Variant:
    """One ablation row: what it trains (None = evaluates an existing checkpoint), how it is
    evaluated, the paper's (image ppl, text ppl) and the row its direction is judged against."""

    name: str
    table: str
    label: str
    paper: tuple[float, float] | None
    train: dict[str, Any] | None = None  # train section fields (name = the variant)
    train_vanilla: dict[str, Any] | None = None  # also train a vanilla checkpoint, `<name>-vanilla`, with these fields
    ra: str = FINAL  # checkpoint evaluated as RA-CM3 when train is None
    vanilla: str = "vanilla"
    evaluate: dict[str, Any] = field(default_factory=dict)
    retrieve: dict[str, Any] | None = None  # new neighbours: the variant runs in a copied root
    against: str = FINAL  # the row the direction is judged against
    model: str = "ra-cm3"  # whose perplexities the row reports
    same_as: str = ""  # reuse this variant's evaluation (same checkpoints and settings)

    @property
    def vanilla_name(self) -> str:
        """The vanilla checkpoint this row trains (`train_vanilla`)."""
        return f"{self.name}-vanilla"


GUIDED = "guidance-w0"  # trains both models with caption dropout; the other weights reuse them
GUIDANCE_TRAIN = {"caption_dropout": 0.1}  # CM3Leon's rate: the unconditional branch is learned


def guidance_row(w: float) -> Variant:
    """Caption -> image at guidance weight w (CLIP score, FID-type), both models trained for it."""
    evaluate = {"guidance": w, "generate": True}
    label = f"caption dropout 0.1, guidance w = {w:g}"
    if f"guidance-w{w:g}" == GUIDED:
        return Variant(GUIDED, "Guidance", label, None, train=GUIDANCE_TRAIN,
                       train_vanilla=GUIDANCE_TRAIN, evaluate=evaluate)
    return Variant(f"guidance-w{w:g}", "Guidance", label, None, ra=GUIDED,
                   vanilla=f"{GUIDED}-vanilla", evaluate=evaluate, against=GUIDED)


VARIANTS: tuple[Variant, ...] = (
    Variant(FINAL, "Table 5", "Retrieve at train & infer (final)", (227, 13)),
    Variant("rand-train-rand-infer", "Table 5", "Random at train & infer", (246, 23),
            train={"random_neighbours": True}, evaluate={"context": "random"}),
    Variant("retr-train-rand-infer", "Table 5", "Retrieve at train, random at infer", (246, 24),
            evaluate={"context": "random"}),
    # Not in the paper (only a generator that knows the truth can do it): memory documents of
    # the query's own entity (never its own document) in context, the ceiling of what this
    # generator gets from retrieval; beside it the retrieved (final) and random rows.
    Variant("oracle-infer", "Controls", "Retrieve at train, oracle (same entity) at infer", None,
            evaluate={"context": "oracle"}),
    Variant("rand-train-retr-infer", "Table 5", "Random at train, retrieve at infer", (243, 18),
            ra="rand-train-rand-infer"),  # the same training as the row above: reuse its checkpoint
    Variant("text-only-docs", "Table 5", "Only text in context (inference)", (234, 15),
            evaluate={"context_modality": "text"}),
    Variant("image-only-docs", "Table 5", "Only image in context (inference)", (234, 15),
            evaluate={"context_modality": "image"}),
    Variant("top-k", "Table 5", "Simply take top K (no redundancy skip, no query dropout)", (244, 17),
            train={}, retrieve={"redundancy_threshold": 1.01, "query_sim_threshold": 1.01,
                                "variants": 0}),
    Variant("no-query-dropout", "Table 5", "Avoid redundancy, no query dropout", (235, 15),
            train={}, retrieve={"variants": 0}),
    Variant("alpha-0", "Table 5", "alpha = 0", (239, 17), train={"alpha": 0.0}),
    Variant("alpha-0.3", "Table 5", "alpha = 0.3", (231, 14), train={"alpha": 0.3}),
    Variant("alpha-1", "Table 5", "alpha = 1", (240, 17), train={"alpha": 1.0}),
    *(Variant(f"k-{k}", "Table 6", f"K = {k} at inference", (p, math.nan), evaluate={"k": k},
              against="k-2") for k, p in ((1, 228), (2, 227), (4, 228), (8, 232))),
    Variant("small-ra", "Fig 9", "small model, RA-CM3", None,
            train={"n_layer": 2, "d_model": 64, "n_head": 2}, against="small-vanilla"),
    Variant("small-vanilla", "Fig 9", "small model, vanilla CM3", None,
            train={"variant": "vanilla", "n_layer": 2, "d_model": 64, "n_head": 2},
            model="vanilla", against="small-ra"),
    Variant("base-vanilla", "Fig 9", "demo model, vanilla CM3", None, model="vanilla",
            against=FINAL, same_as=FINAL),
    # Not in the paper (it trains one example per sequence): packed examples that can see each
    # other, the way racm3 trained before train.block_mask.
    Variant("no-mask-ra", "Packing", "RA-CM3, packed examples see each other (no block mask)",
            None, train={"block_mask": False}),
    Variant("no-mask-vanilla", "Packing", "vanilla CM3, no block mask", None,
            train={"variant": "vanilla", "block_mask": False}, model="vanilla",
            against="base-vanilla"),
    # Beyond the paper (CM3Leon, Re-Imagen): both models trained with the caption dropped from
    # 10% of main documents, evaluated (images sampled) at guidance weights 0, 1 and 3; trained
    # once, by the w = 0 row.
    *(guidance_row(w) for w in (0.0, 1.0, 3.0)),
)


def select(only: str) -> list[Variant]:
    if not only:
        return list(VARIANTS)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {v.name for v in VARIANTS}
    if unknown:
        raise ConfigError("--only", f"unknown variants {sorted(unknown)}; see `racm3 ablate --list`")
    trained = {v.name for v in VARIANTS if v.train is not None}
    names |= {v.ra for v in VARIANTS if v.name in names and v.ra in trained}  # checkpoints it reads
    names |= {x for v in VARIANTS if v.name in names  # a vanilla checkpoint a row trains
              for x in (v.vanilla, v.vanilla.removesuffix("-vanilla")) if x in trained}
    return [v for v in VARIANTS if v.name in names or v.name == FINAL]


def listing() -> list[str]:
    """One line per variant (`racm3 ablate --list`)."""
    return [f"{v.name:<24} {v.table:<8} {v.label}" for v in VARIANTS]
