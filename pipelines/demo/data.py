"""The embedded demo data set: LAION-like metadata whose URLs point at a local HTTP server.

Several hundred named entities, each with its own look (a shape filled with a flag-like grid in
its own palette), most of them rare (Zipf-like, a few documents each). The flag is centred and
sized to the image's shorter side, so after img2dataset's centre crop it lands on the same token
grid in every rendering: a retrieved rendering's tokens predict a new one's (docs/demo-design.md).
Rows that each filter must drop and URLs that fail are mixed in. Two held-out splits in COCO
captions format show the same entities in new renderings: `dev` (captions_dev.json) for every
choice of preset values, and `test` (captions_test.json), reported and never used to choose
anything; they are drawn from separate random streams and share no document.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.demo.backgrounds import BACKGROUNDS
from pipelines.demo.templates import TEMPLATES
from storage.fs import DataRoot

log = logging.getLogger(__name__)

GRID = 6  # flag cells per side; with a 3/4-side flag each cell is 1/8 of the image side
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (0, 0, 128),
], dtype=np.int16)
SHAPES = ("square", "disc", "diamond", "cross")
SYLLABLES = ("ka", "zo", "ri", "vel", "mon", "ta", "qui", "dar", "sel", "po", "lun", "fex", "bri",
             "nor", "tas", "gim", "ulo", "ren", "cha", "wy", "xan", "dop", "ile", "mur")


@dataclass(frozen=True)
class DemoDataConfig(StageConfig):
    """Size and make-up of the generated demo data set (deterministic by seed)."""

    seed: int = 0  # everything below is drawn from this seed
    entities: int = 600  # named entities (the knowledge retrieval must supply)
    zipf_a: float = 2.0  # entity frequency: documents per entity = 1 + Zipf(a), capped
    max_docs_per_entity: int = 40  # cap on an entity's training documents
    eval_images: int = 200  # held-out images in the reported `test` split (5 captions each)
    dev_images: int = 0  # held-out images in the `dev` split, for choosing preset values (0 = eval_images)
    dirty_fraction: float = 0.04  # share of rows of each filter-drop kind (watermark, unsafe, small)
    failing_fraction: float = 0.015  # share of URLs of each failing kind (404, HTML, truncated JPEG)
    min_side: int = 256  # shorter side of clean images (>= the download's min size)
    max_side: int = 320  # longer side of clean images
    host: str = "127.0.0.1"  # where the demo HTTP server listens (URLs in the metadata use it)
    port: int = 18765  # fixed so that regenerating the metadata gives identical URLs
    novel_backgrounds: bool = True  # held-out renderings use a background none of the entity's training docs shows

    def __post_init__(self) -> None:
        self.check(self.entities >= 2, "entities", "need at least 2 entities")
        self.check(self.eval_images >= 1, "eval_images", "need at least 1 held-out image")
        self.check(self.dev_images >= 0, "dev_images", "must be >= 0 (0 = eval_images)")
        self.check(0 <= self.dirty_fraction < 0.3, "dirty_fraction", "must be in [0, 0.3)")
        self.check(0 <= self.failing_fraction < 0.3, "failing_fraction", "must be in [0, 0.3)")
        self.check(self.min_side <= self.max_side, "min_side", "must be <= max_side")
        self.check(1 <= self.port <= 65535, "port", "must be a TCP port")
        self.check(self.zipf_a > 1, "zipf_a", "must be > 1")


@dataclass(frozen=True)
class Entity:
    name: str
    shape: str
    palette: tuple[int, ...]  # indices into PALETTE
    cells: np.ndarray  # (GRID, GRID) palette slot per cell


def make_names(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = int(rng.integers(2, 4))
        name = "".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), k))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_entities(cfg: DemoDataConfig) -> list[Entity]:
    rng = np.random.default_rng([cfg.seed, 1])
    return [entity_look(name, rng) for name in make_names(rng, cfg.entities)]


def entity_look(name: str, rng: np.random.Generator) -> Entity:
    """An entity's look: 4 palette colours, a flag grid over them, a shape."""
    palette = tuple(int(i) for i in rng.choice(len(PALETTE), 4, replace=False))
    cells = rng.integers(0, 4, size=(GRID, GRID))
    return Entity(name, SHAPES[int(rng.integers(len(SHAPES)))], palette, cells)


def shape_mask(shape: str) -> np.ndarray:
    """(GRID, GRID) bool: which flag cells the shape covers."""
    c = (GRID - 1) / 2
    i, j = np.mgrid[0:GRID, 0:GRID]
    if shape == "disc":
        return (i - c) ** 2 + (j - c) ** 2 <= (c + 0.6) ** 2
    if shape == "diamond":
        return np.abs(i - c) + np.abs(j - c) <= c + 0.6
    if shape == "cross":
        return (np.abs(i - c) <= 1) | (np.abs(j - c) <= 1)
    return np.ones((GRID, GRID), bool)


def render(ent: Entity, rng: np.random.Generator, w: int, h: int,
           bg_name: str | None = None) -> tuple[Image.Image, str]:
    """One rendering: background colour + noise + a distractor, the entity's flag centred."""
    drawn = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    bg_name = bg_name or drawn
    img = np.empty((h, w, 3), np.int16)
    img[:] = BACKGROUNDS[bg_name]
    img += rng.integers(-12, 13, size=(h, w, 1), dtype=np.int16)
    side = min(w, h)
    cell = side * 3 // 4 // GRID
    x0, y0 = (w - cell * GRID) // 2, (h - cell * GRID) // 2
    mask = shape_mask(ent.shape)
    jitter = rng.integers(-10, 11, size=3)
    for i in range(GRID):
        for j in range(GRID):
            if mask[i, j]:
                colour = PALETTE[ent.palette[ent.cells[i, j]]] + jitter
                img[y0 + i * cell: y0 + (i + 1) * cell, x0 + j * cell: x0 + (j + 1) * cell] = colour
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _distractor(out, rng, x0, y0, cell * GRID)
    return out, bg_name


def _distractor(img: Image.Image, rng: np.random.Generator, x0: int, y0: int, size: int) -> None:
    """A small blob somewhere in the margin: varies position between renderings."""
    w, h = img.size
    r = max(4, min(x0, y0) // 3)
    side = int(rng.integers(4))
    t = float(rng.uniform(0.1, 0.9))
    cx, cy = [(x0 // 2, int(t * h)), (w - x0 // 2, int(t * h)), (int(t * w), y0 // 2),
              (int(t * w), h - y0 // 2)][side]
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def caption(ent: Entity, bg: str, rng: np.random.Generator) -> str:
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name=ent.name, bg=bg)


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def doc_counts(cfg: DemoDataConfig, rng: np.random.Generator) -> np.ndarray:
    """Training documents per entity: 1 + Zipf(a) capped, so most entities have 2-4."""
    return 1 + np.minimum(rng.zipf(cfg.zipf_a, cfg.entities), cfg.max_docs_per_entity - 1)


@dataclass
class Row:
    URL: str
    TEXT: str
    WIDTH: int
    HEIGHT: int
    pwatermark: float
    punsafe: float
    similarity: float
    kind: str  # clean | watermark | unsafe | small | empty_caption | bad_scheme | 404 | html | truncated
    entity: int


class DemoWriter:
    """Renders documents into the served folder and collects metadata rows."""

    def __init__(self, cfg: DemoDataConfig, www: str, entities: list[Entity]):
        self.cfg, self.www, self.entities = cfg, www, entities
        self.rows: list[Row] = []
        self.backgrounds: dict[int, set[str]] = {}  # entity -> backgrounds of its clean documents
        self.base = f"http://{cfg.host}:{cfg.port}"
        os.makedirs(os.path.join(www, "img"), exist_ok=True)

    def add(self, rng: np.random.Generator, ent_id: int, kind: str) -> None:
        cfg, ent = self.cfg, self.entities[ent_id]
        w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, 2))
        if kind == "small":
            w, h = (int(v) for v in rng.integers(96, cfg.min_side, 2))
        img, bg = render(ent, rng, w, h)
        if kind == "clean":
            self.backgrounds.setdefault(ent_id, set()).add(bg)
        text = caption(ent, bg, rng)
        if kind == "watermark":
            _watermark(img)
        name = f"img/{len(self.rows):07d}.jpg"
        data = jpeg(img)
        if kind == "truncated":
            data = data[: len(data) // 3]
        if kind == "html":
            data = b"<!doctype html><html><body>Image not found</body></html>"
        if kind != "404":
            with open(os.path.join(self.www, name), "wb") as f:
                f.write(data)
        url = f"{self.base}/{name}" if kind != "bad_scheme" else f"ftp://{cfg.host}/{name}"
        self.rows.append(Row(
            URL=url, TEXT="" if kind == "empty_caption" else text, WIDTH=w, HEIGHT=h,
            pwatermark=float(rng.uniform(0.6, 0.99) if kind == "watermark" else rng.beta(1, 8)),
            punsafe=float(rng.uniform(0.6, 0.99) if kind == "unsafe" else rng.beta(1, 10)),
            similarity=float(rng.uniform(0.27, 0.42)), kind=kind, entity=ent_id))


def _watermark(img: Image.Image) -> None:
    d = ImageDraw.Draw(img)
    w, h = img.size
    for y in range(10, h, 40):
        d.text((10 + (y % 80), y), "(c) STOCKPHOTO  watermark", fill=(255, 255, 255))
    d.line([(0, 0), (w, h)], fill=(255, 255, 255), width=3)
    d.line([(0, h), (w, 0)], fill=(255, 255, 255), width=3)


DIRTY_KINDS = ("watermark", "unsafe", "small")
FAILING_KINDS = ("404", "html", "truncated")
RARE_KINDS = ("empty_caption", "bad_scheme")


def generate_metadata(cfg: DemoDataConfig, www: str) -> tuple[pa.Table, list[Entity], dict[int, set[str]]]:
    """Render every training document into `www`; return the metadata table (LAION columns), the
    entities and the backgrounds each entity's clean training documents show."""
    rng = np.random.default_rng([cfg.seed, 2])
    entities = make_entities(cfg)
    counts = doc_counts(cfg, rng)
    kinds = [("clean", e) for e, c in enumerate(counts) for _ in range(int(c))]
    n = len(kinds)
    extra = {k: int(round(n * cfg.dirty_fraction)) for k in DIRTY_KINDS}
    extra |= {k: int(round(n * cfg.failing_fraction)) for k in FAILING_KINDS}
    extra |= {k: max(1, int(round(n * cfg.failing_fraction / 2))) for k in RARE_KINDS}
    for kind, k in extra.items():
        kinds += [(kind, int(e)) for e in rng.integers(0, cfg.entities, k)]
    order = rng.permutation(len(kinds))
    writer = DemoWriter(cfg, www, entities)
    for idx in order:
        kind, ent = kinds[idx]
        writer.add(rng, ent, kind)
    table = pa.Table.from_pylist([r.__dict__ for r in writer.rows])
    return table, entities, writer.backgrounds


# split -> its random stream ([seed, stream]). dev is stream 3, the old single held-out split on
# which the earlier preset values were chosen; test is a stream nothing was ever chosen on.
SPLITS = {"dev": 3, "test": 5}


def novel_background(rng: np.random.Generator, seen: set[str]) -> tuple[str, bool]:
    """A background no training document of the entity shows (True), or any when all are used."""
    fresh = [b for b in BACKGROUNDS if b not in seen]
    pool = fresh or list(BACKGROUNDS)
    return pool[int(rng.integers(len(pool)))], bool(fresh)


def generate_coco(cfg: DemoDataConfig, entities: list[Entity], out_dir: str,
                  counts: dict[int, int], split: str = "test",
                  backgrounds: dict[int, set[str]] | None = None) -> dict:
    """One held-out split: new renderings of training entities, 5 captions each, COCO captions
    JSON; images `images/<split>_<id>.jpg`, ids offset per split so no two splits share an id.

    With `novel_backgrounds`, each rendering composes the entity's look (known only from its few
    memory documents) with a background none of them shows (frequent and learnable), and every
    caption says both: the retrieval baseline then returns the right entity on the wrong
    background, while a generator can compose the two (paper §5.1)."""
    rng = np.random.default_rng([cfg.seed, SPLITS[split]])
    n = cfg.eval_images if split == "test" else (cfg.dev_images or cfg.eval_images)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    seen = sorted(counts)
    chosen = rng.choice(seen, size=min(n, len(seen)), replace=False)
    images: list[dict] = []
    annotations: list[dict] = []
    entity_of: dict[int, str] = {}
    base = 1 + 1_000_000 * list(SPLITS).index(split)
    novel = 0
    for image_id, ent_id in enumerate(sorted(int(c) for c in chosen), start=base):
        side = cfg.min_side
        bg_name = None
        if cfg.novel_backgrounds:
            bg_name, fresh = novel_background(rng, (backgrounds or {}).get(ent_id, set()))
            novel += fresh
        img, bg = render(entities[ent_id], rng, side, side, bg_name)
        file_name = f"{split}_{image_id:07d}.jpg"
        img.save(os.path.join(out_dir, "images", file_name), format="JPEG", quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": side, "height": side})
        entity_of[image_id] = entities[ent_id].name
        templates = rng.choice(len(TEMPLATES), 5, replace=False)
        for t in templates:
            annotations.append({"id": base + len(annotations), "image_id": image_id,
                                "caption": TEMPLATES[int(t)].format(name=entities[ent_id].name, bg=bg)})
    return {"info": {"description": f"racm3 demo held-out split `{split}`", "version": "3",
                     "split": split, "novel_background_images": novel},
            "licenses": [], "images": images, "annotations": annotations,
            "racm3_entities": {str(k): v for k, v in entity_of.items()}}


class DemoDataStage(Stage):
    """Stage `demo`: writes demo/laion.parquet (metadata), laion.www (served), laion.coco (eval)."""

    name = "demo"
    version = "3"
    config = DemoDataConfig
    description = "generate the embedded LAION-like demo data set"

    def plan(self, root: DataRoot, cfg: DemoDataConfig) -> list[ShardSpec]:
        return [ShardSpec("demo", "laion", ())]

    def run_shard(self, ctx: ShardContext, resources: object) -> ShardResult:
        cfg: DemoDataConfig = ctx.cfg
        www = ctx.local_path("www")
        table, entities, backgrounds = generate_metadata(cfg, www)
        clean = table.filter(pa.compute.equal(table["kind"], "clean"))
        counts: dict[int, int] = {}
        for e in clean["entity"].to_pylist():
            counts[e] = counts.get(e, 0) + 1
        coco_dir = ctx.local_path("coco")
        sizes, novel = {}, {}
        for split in SPLITS:
            coco = generate_coco(cfg, entities, coco_dir, counts, split, backgrounds)
            with open(os.path.join(coco_dir, f"captions_{split}.json"), "w") as f:
                json.dump(coco, f)
            sizes[split] = len(coco["images"])
            novel[split] = coco["info"]["novel_background_images"]
        ents = pa.table({"entity": list(range(len(entities))), "name": [e.name for e in entities],
                         "shape": [e.shape for e in entities],
                         "train_docs": [counts.get(i, 0) for i in range(len(entities))]})
        with open(ctx.local_path("entities.parquet"), "wb") as f:
            pq.write_table(ents, f)
        ctx.write_table(table.drop_columns(["kind", "entity"]))
        with open(ctx.local_path("truth.parquet"), "wb") as f:
            pq.write_table(table.select(["URL", "kind", "entity"]), f)
        kinds = dict(zip(*np.unique(table["kind"].to_numpy(zero_copy_only=False), return_counts=True), strict=True))
        return ShardResult(rows_in=0, rows_out=table.num_rows, metrics={
            "rows_by_kind": {str(k): int(v) for k, v in kinds.items()},
            "entities": len(entities), "eval_images": sizes["test"], "dev_images": sizes["dev"],
            "novel_background_images": novel,
            "rare_entities_le4_docs": sum(1 for c in counts.values() if c <= 4)})




# ---------------------------------------------------------------------------- novel entities

NOVEL_STREAMS = (11, 12)  # [seed, stream] of the novel entities' names/looks and of their documents
NOVEL_SEED_OFFSET = 1000  # their test split's seed is the demo's plus this (a stream of its own)


def novel_entities(cfg: DemoDataConfig, n: int) -> list[Entity]:
    """n entities that no training document shows: names the demo's entities do not use (a name
    is never another's word either: captions name entities as words), from a stream of their own."""
    taken = {e.name for e in make_entities(cfg)}
    rng = np.random.default_rng([cfg.seed, NOVEL_STREAMS[0]])
    names = [x for x in make_names(rng, n + len(taken)) if x not in taken][:n]
    return [entity_look(name, rng) for name in names]


def novel_metadata(cfg: DemoDataConfig, www: str, entities: list[Entity],
                   docs: int) -> tuple[pa.Table, dict[int, set[str]]]:
    """`docs` clean documents of each novel entity rendered into `www`: the metadata table and
    the backgrounds each entity's documents show."""
    rng = np.random.default_rng([cfg.seed, NOVEL_STREAMS[1]])
    writer = DemoWriter(cfg, www, entities)
    for ent in rng.permutation(np.repeat(np.arange(len(entities)), docs)):
        writer.add(rng, int(ent), "clean")
    return pa.Table.from_pylist([r.__dict__ for r in writer.rows]), writer.backgrounds


class NovelDataStage(Stage):
    """The novel-entity memory's `demo/laion` shard (`racm3 novel`, in a data root of its own):
    documents of entities that never appear in training, and a COCO test split of new renderings
    of them (novel backgrounds, as the demo's), laid out as the demo stage lays out its own."""

    name = "demo"
    version = "novel-1"

    def __init__(self, entities: int = 40, docs: int = 3):
        self.entities, self.docs = entities, docs

    def plan(self, root: DataRoot, cfg: DemoDataConfig) -> list[ShardSpec]:
        return [ShardSpec("demo", "laion", ())]

    def params(self, cfg: DemoDataConfig) -> dict:
        return cfg.params() | {"novel_entities": self.entities, "novel_docs": self.docs}

    def run_shard(self, ctx: ShardContext, resources: object) -> ShardResult:
        cfg: DemoDataConfig = ctx.cfg
        entities = novel_entities(cfg, self.entities)
        table, backgrounds = novel_metadata(cfg, ctx.local_path("www"), entities, self.docs)
        coco_dir = ctx.local_path("coco")
        split_cfg = replace(cfg, seed=cfg.seed + NOVEL_SEED_OFFSET, eval_images=len(entities))
        coco = generate_coco(split_cfg, entities, coco_dir, dict.fromkeys(range(len(entities)), self.docs),
                             "test", backgrounds)
        coco["info"]["description"] = "racm3 novel entities: test split"
        with open(os.path.join(coco_dir, "captions_test.json"), "w") as f:
            json.dump(coco, f)
        ctx.write_table(table.drop_columns(["kind", "entity"]))
        return ShardResult(rows_in=0, rows_out=table.num_rows, metrics={
            "novel_entities": len(entities), "docs_per_entity": self.docs,
            "eval_images": len(coco["images"])})
