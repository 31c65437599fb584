"""The demo CLIP's objective: captions parsed by template, same-entity positives, re-wording."""

from __future__ import annotations

import numpy as np
import torch
from open_clip.loss import ClipLoss

from pipelines.demo.backgrounds import BACKGROUNDS
from pipelines.demo.clip_objective import caption_labels, multi_positive_loss, parse_caption, reword
from pipelines.demo.templates import TEMPLATES


def test_every_template_and_background_parses_back_to_its_name():
    for t in TEMPLATES:
        for bg in BACKGROUNDS:
            assert parse_caption(t.format(name="dopzozo", bg=bg)) == ("dopzozo", bg), t
    assert parse_caption("a photo of the dopzozo on mars") is None  # not a demo background
    assert parse_caption("an ordinary caption") is None


def test_labels_group_captions_by_entity_and_keep_unparsed_ones_apart():
    caps = ["the kaka on a sky background", "kaka, moss backdrop", "zozo emblem", "zozo emblem",
            "a zozo pictured on sand"]
    lab = caption_labels(caps)
    assert lab.labels[0] == lab.labels[1] and len(set(lab.labels.tolist())) == 4
    assert lab.names == ["kaka", "kaka", None, None, "zozo"]


def test_reword_keeps_the_name_and_draws_template_and_background():
    rng = np.random.default_rng(0)
    caps = ["the kaka on a sky background"] * 200 + ["not a demo caption"]
    out = reword(caps, ["kaka"] * 200 + [None], rng, 1.0)
    parsed = [parse_caption(c) for c in out[:200]]
    assert all(p is not None and p[0] == "kaka" for p in parsed)
    assert {p[1] for p in parsed if p} == set(BACKGROUNDS)  # every background drawn
    assert len(set(out[:200])) > 40 and out[200] == "not a demo caption"
    assert reword(caps[:5], ["kaka"] * 5, rng, 0.0) == caps[:5]


def test_multi_positive_loss_is_clip_loss_with_distinct_labels_and_rewards_same_entity():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(multi_positive_loss(img, txt, torch.arange(6), scale),
                               ClipLoss()(img, txt, scale))
    # Image 0 and caption 1 show one entity: with the shared label, matching them costs less.
    same = torch.tensor([0, 0, 1, 2, 3, 4])
    txt2 = txt.clone()
    txt2[1] = img[0]
    assert multi_positive_loss(img, txt2, same, scale) < multi_positive_loss(img, txt2, torch.arange(6), scale)
