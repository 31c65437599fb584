"""The evaluation split: usable COCO images (storage.coco's rules) as decoded items, in batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from model.clip_encoder import decode_image
from storage.coco import CocoIndex, iter_images, read_index
from storage.fs import DataRoot


@dataclass
class SplitItem:
    """One usable evaluation image with its (non-empty) reference captions."""

    image_id: int
    image: Image.Image  # RGB, as stored
    captions: list[str]
    position: int = 0  # its entry's index in the split (seeds its sampling, whatever the sharding)
    entity: str | None = None  # demo only: the entity it shows (the split's racm3_entities)
    sha256: str = ""  # of the stored image file (a memory document with it is the query's own)


def items(root: DataRoot, index: CocoIndex, start: int = 0,
          stop: int | None = None) -> Iterator[SplitItem]:
    """Decoded items of entries[start:stop]; skips are counted in index.counts."""
    for it in iter_images(root, index, start, stop):
        image = decode_image(it.data)
        if image is None:  # checked decodable by the reader; counted there if not
            index.counts["skipped_undecodable_image"] += 1
            continue
        yield SplitItem(it.entry.image_id, image, it.entry.captions, it.position, it.entry.entity,
                        hashlib.sha256(it.data).hexdigest())


def batches(root: DataRoot, index: CocoIndex, start: int, stop: int | None,
            size: int) -> Iterator[list[SplitItem]]:
    """items() in lists of at most `size` (what is encoded and retrieved together)."""
    batch: list[SplitItem] = []
    for it in items(root, index, start, stop):
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_split(root: DataRoot, coco: str, image_dir: str = "",
               max_images: int = 0) -> tuple[list[SplitItem], dict[str, int]]:
    """Every usable image of a COCO captions file and counts of what was skipped and why."""
    index = read_index(root, coco, image_dir, max_images)
    out = list(items(root, index))
    index.counts["usable_images"] = len(out)
    return out, index.counts
