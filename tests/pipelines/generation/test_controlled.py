"""Controlled generation (§5.3): the background measure reads the demo's renderings right, and the
demonstration experiment runs with the user's documents as the whole context."""

import numpy as np

from pipelines.demo.data import BACKGROUNDS, DemoDataConfig, make_entities, render
from pipelines.generation.controlled import background, background_control, pick_cases
from pipelines.generation.fewshot import memory_by_entity
from pipelines.inference.loader import load_inference
from tests.factories import NAMES


def test_background_of_demo_renderings_at_the_models_resolution():
    ents = make_entities(DemoDataConfig(entities=4))
    rng = np.random.default_rng(0)
    right = 0
    for i in range(24):
        img, bg = render(ents[i % 4], rng, 256, 256)
        right += background(img.resize((32, 32))) == bg
    assert right >= 22  # the distractor blob may cover part of the ring now and then
    assert set(BACKGROUNDS) >= {background(render(ents[0], rng, 300, 260)[0])}


def test_background_control_runs_on_named_documents(trained_root):
    bench = load_inference(trained_root)
    keys = memory_by_entity(bench, set(NAMES))
    assert set(keys) == set(NAMES) and all(len(v) == 2 for v in keys.values())
    cases = pick_cases(bench, keys, 3, seed=0)
    for name, ent, style, _ in cases:
        assert ent in keys[name] and style not in keys[name]
    out, share = background_control(bench, keys, n_cases=2, samples=2)
    assert share["cases"] == len(out) <= 2
    for c in out:
        assert len(c.plain) == len(c.steered) == 2
    assert all(0 <= share[k] <= 1 for k in ("plain", "steered")) or not out
