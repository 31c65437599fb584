"""`racm3 classify`: few-shot accuracy vs k on the demo's entities (paper §5.4, Fig 8).

Binary tasks: two entities, one test image of each as queries, demonstrations taken from each
entity's memory documents (their images re-captioned with the label). Labels are either the entity
names (semantic) or two arbitrary words mapped to the entities at random per task (non-semantic:
the model must learn the mapping in context, as the paper's "animal X" / "animal Y"). k passes,
each with a different demonstration pair in random order, probabilities averaged.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from model.clip_encoder import decode_image
from pipelines.generation.classify import ensemble, pass_probs
from pipelines.inference.loader import Inference, load_inference
from storage.fs import DataRoot

log = logging.getLogger(__name__)

SPLITS = ("demo/laion.coco/captions_test.json", "demo/laion.coco/captions_val.json")
WORDS = ("x", "y", "z", "w", "q", "j")  # non-semantic labels: never an entity name or a colour
VARIANTS = ("ra-cm3", "vanilla")


@dataclass(frozen=True)
class FewShotConfig:
    coco: str = ""  # COCO captions JSON with `racm3_entities` ("" = test split, else held-out)
    ks: tuple[int, ...] = (0, 1, 2, 4)  # passes (k-shot) to report; 0 = no demonstrations
    tasks: int = 40  # binary tasks (entity pairs), 2 queries each
    template: str = "a photo of the {label}"  # every caption, demonstrations' and labels'
    seed: int = 0
    device: str = "cpu"
    variants: tuple[str, ...] = VARIANTS

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 0:
            raise ValueError(f"ks must be k >= 0 values, got {self.ks}")
        if self.tasks < 1:
            raise ValueError("tasks must be >= 1")


@dataclass
class Task:
    """Two entities, their query codes, and their demonstration images' codes (cycled for k)."""

    names: tuple[str, str]
    queries: tuple[list[int], list[int]]
    demos: tuple[list[list[int]], list[list[int]]]
    words: tuple[str, str] = ("x", "y")


@dataclass
class Split:
    path: str
    images: dict[str, Image.Image] = field(default_factory=dict)  # entity name -> a test image
    captions: dict[str, str] = field(default_factory=dict)  # entity name -> that image's caption


def find_split(root: DataRoot, coco: str) -> str:
    for path in ([coco] if coco else list(SPLITS)):
        if root.exists(root.resolve(path)):
            return root.resolve(path)
    raise ValueError(f"no COCO split found (tried {coco or ', '.join(SPLITS)}): run the demo or "
                     f"pass --coco")


def read_entity_split(root: DataRoot, coco: str) -> Split:
    """The first usable test image of each entity named in the split's `racm3_entities`."""
    path = find_split(root, coco)
    with root.fs.open(path, "r") as f:
        data = json.load(f)
    names = data.get("racm3_entities")
    if not names:
        raise ValueError(f"{path} has no racm3_entities (image id -> entity name): classification "
                         f"needs the demo's labelled split")
    split = Split(path)
    first_caption: dict[int, str] = {}
    for a in data.get("annotations", []):
        first_caption.setdefault(a.get("image_id"), str(a.get("caption") or ""))
    folder = posixpath.join(posixpath.dirname(path), "images")
    for im in data.get("images", []):
        name = names.get(str(im["id"]))
        file = posixpath.join(folder, im.get("file_name", ""))
        if name and name not in split.images and root.exists(file):
            with root.fs.open(file, "rb") as f:
                image = decode_image(f.read())
            if image is not None:
                split.images[name] = image
                split.captions[name] = first_caption.get(im["id"], "")
    return split


def memory_by_entity(bench: Inference, names: set[str]) -> dict[str, list[str]]:
    """Entity name -> memory keys whose caption names it (as a whole word), sorted."""
    out: dict[str, list[str]] = {}
    for key, cap in sorted(bench.all_captions().items()):
        for word in set(re.findall(r"[a-z]+", cap.lower())) & names:
            if key in bench.memory:
                out.setdefault(word, []).append(key)
    return out


def eligible(docs: dict[str, list[str]], names: list[str], k: int) -> tuple[list[str], int]:
    """Entities with >= k memory documents (each pass its own demonstration) when at least 8
    have them, else those with >= 2 (demonstrations then cycle); and that minimum."""
    for need in (max(k, 2), 2):
        ok = sorted(n for n in names if len(docs.get(n, [])) >= need)
        if len(ok) >= 8 or need == 2:
            return ok, need
    return [], 2


def make_tasks(bench: Inference, split: Split, cfg: FewShotConfig) -> tuple[list[Task], int]:
    """Random entity pairs among entities with a test image and enough memory documents."""
    rng = np.random.default_rng(cfg.seed)
    docs = memory_by_entity(bench, set(split.images))
    names, need = eligible(docs, sorted(split.images), max(cfg.ks))
    if len(names) < 2:
        raise ValueError(f"only {len(names)} entities of {split.path} have a test image and 2 "
                         f"memory documents: classification needs 2")
    codes = dict(zip(names, bench.encode_images([split.images[n] for n in names]), strict=True))
    tasks = []
    for _ in range(cfg.tasks):
        a, b = (names[i] for i in rng.choice(len(names), 2, replace=False))
        demo = tuple([bench.vocab.decode(list(bench.memory[k]))[1] for k in rng.permutation(docs[n])]
                     for n in (a, b))
        w = rng.choice(len(WORDS), 2, replace=False)
        tasks.append(Task((a, b), (codes[a], codes[b]), demo, (WORDS[w[0]], WORDS[w[1]])))  # type: ignore[arg-type]
    return tasks, need


def task_passes(bench: Inference, task: Task, labels: tuple[str, str], k: int, cfg: FewShotConfig,
                rng: np.random.Generator) -> list[list[np.ndarray]]:
    """k passes of one demonstration per class (cycling through each class's documents), the
    pair's order drawn at random per pass."""
    caps = [bench.encode_caption(cfg.template.format(label=lab)) for lab in labels]
    passes = []
    for i in range(k):
        pair = [np.asarray(bench.vocab.encode(caps[c], task.demos[c][i % len(task.demos[c])]))
                for c in (0, 1)]
        passes.append(pair if rng.random() < 0.5 else pair[::-1])
    return passes


def task_accuracy(bench: Inference, tasks: list[Task], semantic: bool, cfg: FewShotConfig
                  ) -> dict[int, float]:
    """Accuracy per k over both queries of every task."""
    rng = np.random.default_rng([cfg.seed, int(semantic)])
    hits = {k: 0 for k in cfg.ks}
    for task in tasks:
        labels = task.names if semantic else task.words
        label_ids = [bench.encode_caption(cfg.template.format(label=lab)) for lab in labels]
        passes = task_passes(bench, task, labels, max(cfg.ks), cfg, rng)
        for truth, query in enumerate(task.queries):
            probs = pass_probs(bench.model, bench.vocab, query, label_ids, passes)  # (P, 2)
            zero = pass_probs(bench.model, bench.vocab, query, label_ids, [])  # no demos
            for k in cfg.ks:
                p = ensemble(zero if k == 0 else probs, k)
                hits[k] += int(np.argmax(p) == truth)
    return {k: hits[k] / (2 * len(tasks)) for k in cfg.ks}


def run_fewshot(root: DataRoot, cfg: FewShotConfig) -> dict[str, Any]:
    """{"split", "tasks", "ks", "accuracy": {variant: {"semantic"|"non-semantic": {k: acc}}}}."""
    bench = load_inference(root, cfg.variants, cfg.device)
    split = read_entity_split(root, cfg.coco)
    tasks, need = make_tasks(bench, split, cfg)
    acc: dict[str, dict[str, dict[int, float]]] = {}
    for variant in cfg.variants:
        b = bench.use(variant)
        acc[variant] = {name: task_accuracy(b, tasks, semantic, cfg)
                        for name, semantic in (("semantic", True), ("non-semantic", False))}
        log.info("few-shot %s: %s", variant, acc[variant])
    return {"split": root.rel(split.path),
            "tasks": len(tasks), "queries": 2 * len(tasks), "ks": list(cfg.ks),
            "min_memory_docs": need,
            "template": cfg.template, "accuracy": acc}


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per (model, labels), one column per k."""
    ks = result["ks"]
    lines = [f"few-shot binary classification, {result['queries']} queries "
             f"({result['tasks']} entity pairs, >= {result.get('min_memory_docs', 2)} memory "
             f"documents each) from {result['split']}", "",
             "| model | labels | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for variant, by_labels in result["accuracy"].items():
        for labels, row in by_labels.items():
            lines.append(f"| {variant} | {labels} | "
                         + " | ".join(f"{row[k]:.2f}" for k in ks) + " |")
    return "\n".join(lines)
