"""COCO-format captions splits: the one reader (and rule set) every stage and evaluation uses."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from storage.fs import DataRoot, file_digest
from storage.manifest import InputRef, read_manifest, upstream_ref


@dataclass
class CocoSplit:
    """Held-out images (encoded bytes) and their captions, in COCO file order."""

    images: list[bytes]
    captions: list[list[str]]  # per image, in annotation order
    entities: list[str] | None = None  # demo only: the entity each image shows




def load_coco(root: DataRoot, path: str, max_images: int = 0, image_dir: str = "") -> CocoSplit:
    """Read a COCO captions JSON and its image files (image_dir, or `images/` beside it, or beside it)."""
    path = root.resolve(path)
    if not root.exists(path):
        raise FileNotFoundError(f"COCO captions file {path} not found: run `racm3 run demo` or set "
                                f"`coco` to a captions_val.json with its images")
    with root.fs.open(path, "r") as f:
        coco = json.load(f)
    caps: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    images = [im for im in coco["images"] if len(caps.get(im["id"], [])) >= 2]
    images = images[:max_images] if max_images else images
    base = posixpath.dirname(path)
    dirs = [root.resolve(image_dir)] if image_dir else [posixpath.join(base, "images"), base]
    data = [_read_image(root, dirs, im["file_name"]) for im in images]
    ents = coco.get("racm3_entities")
    return CocoSplit(data, [caps[im["id"]] for im in images],
                     [ents[str(im["id"])] for im in images] if ents else None)



def _read_image(root: DataRoot, dirs: list[str], file_name: str) -> bytes:
    for d in dirs:
        if root.exists(p := posixpath.join(d, file_name)):
            with root.fs.open(p, "rb") as f:
                return f.read()
    raise FileNotFoundError(f"COCO image {file_name} not found in {' or '.join(dirs)}: set "
                            f"`retrieval_eval.image_dir` to the folder holding the images")



def coco_ref(root: DataRoot, coco: str) -> InputRef:
    """The COCO split as an input: the demo stage's shard when it made it, else the file's digest."""
    path = root.resolve(coco)
    demo = read_manifest(root, "demo", "laion")
    if demo is not None and root.rel(path).startswith("demo/laion.coco"):
        return upstream_ref(root, "demo", "laion")
    if not root.exists(path):
        raise FileNotFoundError(f"COCO captions file {path} not found: run `racm3 run demo` or set "
                                f"`coco` to a captions_val.json with its images")
    return InputRef(path=root.rel(path), digest=file_digest(root.fs, path))
