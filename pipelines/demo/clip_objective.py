"""The demo CLIP's objective: same-entity positives and captions re-worded so only the name counts.

The demo caption names an entity and a background from a template (pipelines.demo.data). Fitted
with plain CLIP pairs, the tiny text tower keyed on the background word and on name pieces shared
with other entities, so a caption query found the same entity for only ~55 % of dev queries.
Two changes, both read from the caption alone (no ground truth): every document whose caption
names the same entity is a positive (a multi-positive, symmetric InfoNCE: other renderings of
the entity on other backgrounds are pulled together, not pushed apart as in-batch negatives),
and each training caption is re-worded with a random template and background, so neither the
template nor the background word predicts the image and the text tower must read the name.
Captions that no template parses keep their own text and count as their own entity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.demo.backgrounds import BACKGROUNDS
from pipelines.demo.templates import TEMPLATES


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{name\}|\{bg\})", template)
    body = "".join({"{name}": r"(?P<name>[a-z]+)", "{bg}": r"(?P<bg>[a-z]+)"}.get(p, re.escape(p))
                   for p in parts)
    return re.compile(f"^{body}$")


PATTERNS = tuple(_pattern(t) for t in TEMPLATES)


def parse_caption(caption: str) -> tuple[str, str] | None:
    """(entity name, background) of a demo caption, or None when no template fits."""
    for p in PATTERNS:
        m = p.match(caption.strip())
        if m and m["bg"] in BACKGROUNDS:
            return m["name"], m["bg"]
    return None


@dataclass
class CaptionLabels:
    """Per training caption: an entity label (same name, same label) and its parsed name."""

    labels: np.ndarray  # (N,) int
    names: list[str | None]  # None: not a demo caption (kept verbatim, its own label)


def caption_labels(captions: list[str]) -> CaptionLabels:
    ids: dict[str, int] = {}
    labels, names = [], []
    for i, c in enumerate(captions):
        parsed = parse_caption(c)
        key = parsed[0] if parsed else f"\0{i}"  # an unparsed caption is an entity of its own
        labels.append(ids.setdefault(key, len(ids)))
        names.append(parsed[0] if parsed else None)
    return CaptionLabels(np.asarray(labels), names)


def reword(captions: list[str], names: list[str | None], rng: np.random.Generator,
           p: float) -> list[str]:
    """Each parsed caption, with probability p, in a random template with a random background."""
    bgs = list(BACKGROUNDS)
    out = []
    for c, name in zip(captions, names, strict=True):
        if name is None or rng.random() >= p:
            out.append(c)
        else:
            t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            out.append(t.format(name=name, bg=bgs[int(rng.integers(len(bgs)))]))
    return out


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every same-label pair is a positive (target spread evenly over
    them); with all labels distinct it equals open_clip's ClipLoss."""
    logits = scale * img @ txt.T  # (B, B)
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)  # symmetric: same.T == same
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
