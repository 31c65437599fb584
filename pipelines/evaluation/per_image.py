"""Per-image work of an evaluation shard: encode and retrieve a batch, sample and rerank with each
model, the retrieval baseline, and each example's perplexity sums (what the reduce step needs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model.images import to_tensor
from pipelines.core.config import ConfigError
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.controls import EntityDocs, names_entity, random_keys
from pipelines.evaluation.guard import guarded_search
from pipelines.evaluation.judge import clip_scores
from pipelines.evaluation.models import GENERATORS
from pipelines.evaluation.split import SplitItem
from pipelines.inference.guidance import Guidance, guided_images
from pipelines.inference.images import at_size
from pipelines.inference.loader import Inference
from pipelines.inference.sampling import Sampling, caption_nll, generate_captions
from pipelines.inference.scoring import HeldOutExample, example_nll

RUNS = {"ra-cm3": ("ra-cm3", True), "ra-cm3 (no retrieval)": ("ra-cm3", False),
        "vanilla": ("vanilla", False)}  # perplexity run -> (model, with retrieval)


@dataclass
class Example:
    """One evaluation image: its prompts, what was retrieved for each, what each model made."""

    item: SplitItem
    real: Image.Image  # the image at the models' resolution (the FID reference)
    codes: list[int]  # its VQGAN codes
    caption_ids: list[int]  # its first caption, tokenized
    by_caption: list[str]  # memory keys retrieved with the caption
    by_image: list[str]  # memory keys retrieved with the image
    images: dict[str, Image.Image] = field(default_factory=dict)  # model -> kept image
    clip: dict[str, float] = field(default_factory=dict)  # model -> CLIP score of the kept image
    captions: dict[str, str] = field(default_factory=dict)  # model -> kept caption
    nll: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)  # run -> part -> (sum, n)
    same_entity: dict[str, list[bool]] = field(default_factory=dict)  # query -> per context doc: names the image's entity (demo)
    caption_entity: dict[str, bool] = field(default_factory=dict)  # model -> its kept caption names the image's entity (demo)

    @property
    def caption(self) -> str:
        return self.item.captions[0]


def entity_docs(setup: Inference) -> EntityDocs:
    """The memory's documents by entity (built once per set-up, shared by its copies)."""
    if "entity_docs" not in setup.shared:
        index = setup.retriever.index
        n = len(index.keys)
        setup.shared["entity_docs"] = EntityDocs(setup.all_captions(), dict(zip(
            index.keys[np.arange(n)].tolist(), index.sha256[np.arange(n)].tolist(), strict=True)))
    return setup.shared["entity_docs"]


def controlled(setup: Inference, items: list[SplitItem], context: str, k: int,
               excluded: set[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(by caption, by image) keys of a control: random documents, or oracle ones (the same for
    both queries: the entity is the query's, whichever part asks)."""
    if context == "random":
        keys = sorted(setup.memory)
        return ([random_keys(keys, it.position, k, excluded, 0) for it in items],
                [random_keys(keys, it.position, k, excluded, 1) for it in items])
    docs = entity_docs(setup)
    if any(it.entity is None for it in items):
        raise ConfigError("evaluate.context", "\"oracle\" needs the entity of every image "
                          "(racm3_entities in the COCO file: demo splits only)")
    oracle = [docs.oracle(str(it.entity), it.sha256, it.position, k, excluded) for it in items]
    return oracle, [list(o) for o in oracle]


def prepare(setup: Inference, items: list[SplitItem], cfg: EvaluateConfig, excluded: set[str]) -> list[Example]:
    """Encode one batch (codes, caption ids) and retrieve with the caption and with the image
    (or, as a control, draw random or oracle memory documents: `cfg.context`)."""
    k = cfg.k
    size = setup.tok_cfg.image_size
    reals = [at_size(it.image, size) for it in items]  # (R, R, 3) uint8 each
    codes = setup.tok.vqgan.encode(to_tensor(np.stack(reals))).flatten(1).tolist()
    enc = setup.retriever.encoder
    by_cap = guarded_search(setup.retriever, enc.encode_text([it.captions[0] for it in items]),
                            excluded, k)
    by_img = guarded_search(setup.retriever, enc.encode_image([it.image for it in items]),
                            excluded, k)
    if cfg.context != "retrieved":
        by_cap, by_img = controlled(setup, items, cfg.context, k, excluded)
    limit = setup.tok_cfg.max_caption_tokens
    out = [Example(it, Image.fromarray(r), c, setup.tok.text.encode(it.captions[0])[:limit], bc, bi)
           for it, r, c, bc, bi in zip(items, reals, codes, by_cap, by_img, strict=True)]
    for ex in out:
        if ex.item.entity is not None:  # demo: is the context about the image's entity?
            ex.same_entity = {q: [names_entity(setup.captions.get(key, ""), ex.item.entity)
                                  for key in keys]
                              for q, keys in (("caption", ex.by_caption), ("image", ex.by_image))}
    return out


def context_doc(setup: Inference, key: str, modality: str) -> np.ndarray | None:
    """A memory document as put in context: whole ("mixed"), or only its caption / its image."""
    doc = setup.memory.get(key)
    if doc is None or modality == "mixed":
        return doc
    caption, image = setup.vocab.decode(doc.tolist())
    part = (caption, None) if modality == "text" else (None, image)
    return np.asarray(setup.vocab.encode(*part)) if (part[0] or part[1]) else None


def context_docs(setup: Inference, keys: list[str], k: int, modality: str) -> list[np.ndarray]:
    docs = (context_doc(setup, key, modality) for key in keys[:k])
    return [d for d in docs if d is not None]


def context(setup: Inference, keys: list[str], variant: str, k: int,
            modality: str = "mixed") -> list[np.ndarray]:
    return context_docs(setup, keys, k, modality) if variant == "ra-cm3" else []


def caption_to_image(setup: Inference, ex: Example, variant: str, cfg: EvaluateConfig,
                     gen: torch.Generator) -> None:
    """Sample N images for the caption (with classifier-free guidance of weight
    `cfg.guidance`; 0 = plain sampling), keep the one the retrieval CLIP scores best with it (the
    paper's reranking); its CLIP score comes from the judge (the same CLIP unless configured)."""
    params = Sampling(cfg.image_temperature, 0, cfg.image_top_p)
    docs = context(setup, ex.by_caption, variant, cfg.k, cfg.context_modality)
    codes = guided_images(setup.models[variant], setup.vocab, ex.caption_ids, setup.grid,
                          cfg.image_samples, docs, Guidance(caption=cfg.guidance), params,
                          gen)  # (N, g*g)
    images = setup.decode_codes(codes)
    enc = setup.retriever.encoder
    scores = enc.encode_image(images) @ enc.encode_text([ex.caption])[0]  # (N,)
    best = int(np.argmax(scores))
    judge = setup.shared.get("judge") or enc
    score = scores[best] if judge is enc else clip_scores(judge, [images[best]], ex.caption)[0]
    ex.images[variant], ex.clip[variant] = images[best], float(score)


def image_to_caption(setup: Inference, ex: Example, variant: str, cfg: EvaluateConfig,
                     gen: torch.Generator) -> None:
    """Sample M captions for the image (infilling), keep the lowest-perplexity one."""
    model = setup.models[variant]
    ctx_docs = context(setup, ex.by_image, variant, cfg.k, cfg.context_modality)
    params = Sampling(cfg.text_temperature, 0, cfg.text_top_p)
    caps = generate_captions(model, setup.vocab, ex.codes, cfg.caption_samples,
                             cfg.max_caption_tokens, ctx_docs, params, gen)
    nll = caption_nll(model, setup.vocab, ex.codes, caps, ctx_docs)
    best = int(np.argmin(nll))
    ex.captions[variant] = setup.tok.text.decode(caps[best]) if math.isfinite(nll[best]) else ""


def retrieval_baseline(setup: Inference, ex: Example) -> None:
    """The paper's baseline: the top document retrieved with the prompt is the output."""
    if ex.by_caption and ex.by_caption[0] in setup.memory:
        _, img = setup.vocab.decode(setup.memory[ex.by_caption[0]].tolist())
        if img:
            ex.images["retrieval-baseline"] = setup.decode_codes(np.asarray([img]))[0]
    if ex.by_image:
        ex.captions["retrieval-baseline"] = setup.captions.get(ex.by_image[0], "")


def perplexities(setup: Inference, ex: Example, k: int, modality: str = "mixed") -> None:
    """Per run: image NLL (caption first, retrieved by the caption), caption NLL in the infilling
    form (image first, retrieved by the image) and, for comparison, caption first."""
    if not ex.caption_ids:
        return
    held = HeldOutExample(setup.vocab.encode(ex.caption_ids, ex.codes),
                          by_caption=[list(d) for d in context_docs(setup, ex.by_caption, k, modality)],
                          by_image=[list(d) for d in context_docs(setup, ex.by_image, k, modality)])
    for run, (variant, with_retrieval) in RUNS.items():
        model = setup.models[variant]
        infill = example_nll(model, setup.vocab, held, with_retrieval, k, "infill")
        first = example_nll(model, setup.vocab, held, with_retrieval, k, "first")
        ex.nll[run] = {"image": infill["image"], "text": infill["text"], "text_first": first["text"]}


def run_example(setup: Inference, ex: Example, cfg: EvaluateConfig) -> None:
    """Everything one image needs, seeded by its position in the split (sharding-independent)."""
    device = next(setup.models["ra-cm3"].parameters()).device
    for j, variant in enumerate(GENERATORS if cfg.generate else ()):
        gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + ex.item.position * 2 + j)
        caption_to_image(setup, ex, variant, cfg, gen)
        image_to_caption(setup, ex, variant, cfg, gen)
    if cfg.generate:
        retrieval_baseline(setup, ex)
        if ex.item.entity is not None:  # demo: does each generated caption name the entity?
            ex.caption_entity = {m: names_entity(cap, ex.item.entity) for m, cap in ex.captions.items()}
    with torch.no_grad():
        perplexities(setup, ex, cfg.k, cfg.context_modality)
