"""COCO-format captions splits: the one reader (and rule set) every stage and evaluation uses.

Rules, each skip counted by reason (never a crash on a bad entry):
- an annotation whose `image_id` is not listed -> `skipped_unknown_image_id`;
- an annotation with an empty/blank caption -> `skipped_empty_caption`;
- an image with fewer than `min_captions` usable captions -> `skipped_no_caption` (none) or
  `skipped_too_few_captions` (some, but fewer than asked: Table 4 needs a second caption as query);
- `max_images` keeps the first that many images that pass the caption rules (file order);
- an image file that is not found -> `skipped_missing_image`, not decodable -> `skipped_undecodable_image`.
The metadata pass is separate from reading image bytes, so a caller can stream the images in
batches (`iter_images`) or address a range of them (an evaluation shard).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from storage.fs import DataRoot, file_digest
from storage.manifest import InputRef, read_manifest, upstream_ref

SKIP_REASONS = ("unknown_image_id", "empty_caption", "no_caption", "too_few_captions",
                "missing_image", "undecodable_image")


@dataclass
class CocoEntry:
    """One listed image that passed the caption rules (its bytes are not read yet)."""

    image_id: int
    file_name: str
    captions: list[str]  # non-empty, stripped, in annotation order
    entity: str | None = None  # demo only: the entity it shows


@dataclass
class CocoIndex:
    """The metadata of a split: usable entries in file order, where the images are, the counts."""

    path: str
    dirs: list[str]  # folders searched for image files, in order
    entries: list[CocoEntry]
    counts: dict[str, int]


@dataclass
class CocoItem:
    """One usable image: its entry and its encoded bytes (checked decodable)."""

    entry: CocoEntry
    data: bytes
    position: int = 0  # index of its entry in CocoIndex.entries


@dataclass
class CocoSplit:
    """Held-out images (encoded bytes) and their captions, in COCO file order."""

    images: list[bytes]
    captions: list[list[str]]  # per image, in annotation order
    entities: list[str] | None = None  # demo only: the entity each image shows
    image_ids: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # what was read and skipped, by reason

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} of the non-zero skips (a manifest's `dropped`)."""
        return {k.removeprefix("skipped_"): v for k, v in self.counts.items()
                if k.startswith("skipped_") and v}


def not_found(path: str) -> FileNotFoundError:
    return FileNotFoundError(f"COCO captions file {path} not found: run `racm3 run demo` or set "
                             f"`coco` to a captions JSON with its images (under `images/` beside "
                             f"it, or `image_dir`)")


def read_index(root: DataRoot, coco: str, image_dir: str = "", max_images: int = 0,
               min_captions: int = 1) -> CocoIndex:
    """Parse a COCO captions JSON under the rules above (no image is read)."""
    path = root.resolve(coco)
    if not root.exists(path):
        raise not_found(path)
    with root.fs.open(path, "r") as f:
        data = json.load(f)
    listed = data.get("images", [])
    ids = {im.get("id") for im in listed}
    counts = {"images_listed": len(listed), "annotations": len(data.get("annotations", []))}
    counts |= {f"skipped_{r}": 0 for r in SKIP_REASONS}
    caps: dict[int, list[str]] = {}
    for a in data.get("annotations", []):
        text = str(a.get("caption") or "").strip()
        if a.get("image_id") not in ids:
            counts["skipped_unknown_image_id"] += 1
        elif not text:
            counts["skipped_empty_caption"] += 1
        else:
            caps.setdefault(a["image_id"], []).append(text)
    ents = data.get("racm3_entities") or {}
    entries: list[CocoEntry] = []
    for im in listed:
        n = len(caps.get(im.get("id"), []))
        if n < max(min_captions, 1):
            counts["skipped_no_caption" if n == 0 else "skipped_too_few_captions"] += 1
        elif not max_images or len(entries) < max_images:
            entries.append(CocoEntry(int(im["id"]), str(im.get("file_name", "")), caps[im["id"]],
                                     ents.get(str(im["id"]))))
    dirs = ([root.resolve(image_dir)] if image_dir
            else [posixpath.join(posixpath.dirname(path), "images"), posixpath.dirname(path)])
    return CocoIndex(path, dirs, entries, counts)


def read_image(root: DataRoot, dirs: list[str], file_name: str) -> bytes | None:
    for d in dirs:
        if file_name and root.exists(p := posixpath.join(d, file_name)):
            with root.fs.open(p, "rb") as f:
                return f.read()
    return None


def decodable(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def iter_images(root: DataRoot, index: CocoIndex, start: int = 0,
                stop: int | None = None) -> Iterator[CocoItem]:
    """The usable images of entries[start:stop], one at a time; missing or undecodable ones are
    counted in index.counts and skipped."""
    for pos, entry in enumerate(index.entries[start:stop], start=start):
        data = read_image(root, index.dirs, entry.file_name)
        if data is None:
            index.counts["skipped_missing_image"] += 1
        elif not decodable(data):
            index.counts["skipped_undecodable_image"] += 1
        else:
            yield CocoItem(entry, data, pos)


def load_coco(root: DataRoot, path: str, max_images: int = 0, image_dir: str = "",
              min_captions: int = 1) -> CocoSplit:
    """The whole split in memory (fine for recall and fit-clip at demo scale), with its counts."""
    index = read_index(root, path, image_dir, max_images, min_captions)
    items = list(iter_images(root, index))
    index.counts["usable_images"] = len(items)
    has_ents = bool(items) and all(it.entry.entity is not None for it in items)
    return CocoSplit([it.data for it in items], [it.entry.captions for it in items],
                     [str(it.entry.entity) for it in items] if has_ents else None,
                     [it.entry.image_id for it in items], index.counts)


def coco_ref(root: DataRoot, coco: str) -> InputRef:
    """The COCO split as an input: the demo stage's shard when it made it, else the file's digest."""
    path = root.resolve(coco)
    demo = read_manifest(root, "demo", "laion")
    if demo is not None and root.rel(path).startswith("demo/laion.coco"):
        return upstream_ref(root, "demo", "laion")
    if not root.exists(path):
        raise not_found(path)
    return InputRef(path=root.rel(path), digest=file_digest(root.fs, path))
