"""Controlled generation (paper §5.3): demonstrations the user puts in context steer the output,
e.g. an entity's document plus a style document showing the wanted background.

`controlled_images` is caption -> image with the user's documents instead of retrieved ones.
`background_control` measures it on the demo's entities: the caption names only the entity, a
second demonstration (another entity) shows a background; an output "follows" when its border
(the background cells of the demo's renderings) is nearest to that background's colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipelines.demo.backgrounds import BACKGROUNDS
from pipelines.generation.translate import Context, Ranked, caption_to_image
from pipelines.inference.loader import Inference
from pipelines.inference.sampling import Sampling

COLOURS = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (8, 3)
NAMES = list(BACKGROUNDS)


def controlled_images(bench: Inference, caption: str, demos: Context, n: int,
                      params: Sampling = Sampling(), generator: torch.Generator | None = None) -> Ranked:
    """n images for the caption with the demonstrations as the whole context, best CLIP first."""
    return caption_to_image(bench, caption, demos, n, params, generator=generator)


def background(image: Image.Image, ring: float = 1 / 8) -> str:
    """Name of the demo background nearest to the median colour of the image's outer ring."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    w = max(1, int(round(arr.shape[0] * ring)))
    border = np.concatenate([arr[:w].reshape(-1, 3), arr[-w:].reshape(-1, 3),
                             arr[:, :w].reshape(-1, 3), arr[:, -w:].reshape(-1, 3)])
    med = np.median(border, axis=0)
    return NAMES[int(np.argmin(((COLOURS - med) ** 2).sum(1)))]


@dataclass
class ControlCase:
    """One entity, one style demonstration and what was made with and without it."""

    caption: str
    entity_key: str
    style_key: str
    target: str  # the style document's background
    plain: list[Image.Image] = field(default_factory=list)  # context: the entity's document only
    steered: list[Image.Image] = field(default_factory=list)  # context: style doc, then entity doc


def image_of(bench: Inference, key: str) -> Image.Image:
    image = bench.parts(bench.memory[key])[1]
    if image is None:
        raise ValueError(f"memory document {key} has no image")
    return image


def pick_cases(bench: Inference, entity_keys: dict[str, list[str]], n_cases: int,
               seed: int) -> list[tuple[str, str, str, str]]:
    """(entity name, entity key, style key, target background) with the style document showing a
    background other than the entity document's own."""
    rng = np.random.default_rng(seed)
    keys = sorted(k for ks in entity_keys.values() for k in ks)
    names = sorted(entity_keys)
    cases: list[tuple[str, str, str, str]] = []
    for i in rng.permutation(len(names)):
        if len(cases) == n_cases:
            break
        name = names[i]
        ent = entity_keys[name][0]
        own = background(image_of(bench, ent))
        for j in rng.permutation(len(keys))[:20]:
            style = keys[j]
            if style in entity_keys[name]:
                continue
            bg = background(image_of(bench, style))
            if bg != own:
                cases.append((name, ent, style, bg))
                break
    return cases


def background_control(bench: Inference, entity_keys: dict[str, list[str]], n_cases: int = 12,
                       samples: int = 2, seed: int = 0,
                       template: str = "a photo of the {name}") -> tuple[list[ControlCase], dict[str, float]]:
    """Cases and the share of outputs whose background is the style document's, with the style
    document in context (steered) and without it (plain); chance is 1/8."""
    out = []
    gen = torch.Generator(bench.device).manual_seed(seed)
    for name, ent, style, bg in pick_cases(bench, entity_keys, n_cases, seed):
        cap = template.format(name=name)
        plain = controlled_images(bench, cap, Context.of_keys(bench, [ent]), samples, generator=gen)
        steered = controlled_images(bench, cap, Context.of_keys(bench, [style, ent]), samples,
                                    generator=gen)
        out.append(ControlCase(cap, ent, style, bg, plain.images, steered.images))
    def share(attr: str) -> float:
        hits = [background(im) == c.target for c in out for im in getattr(c, attr)]
        return float(np.mean(hits)) if hits else float("nan")
    return out, {"steered": share("steered"), "plain": share("plain"), "cases": float(len(out))}
