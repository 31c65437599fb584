"""Controls that isolate retrieval: oracle context (memory documents of the query's entity, never
its own document nor a guarded near-duplicate), random context, and `evaluate.context`'s checks;
the same-entity rate of generated captions; `evaluate.guidance` in evaluation's sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.core.config import ConfigError
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.controls import (
    EntityDocs,
    caption_entity_rate,
    names_entity,
    same_entity_rates,
)
from pipelines.evaluation.evaluate import EvaluatePartStage
from pipelines.evaluation.metrics import CAPTION_ENTITY, compute
from pipelines.evaluation.per_image import caption_to_image, prepare, run_example
from pipelines.evaluation.records import ShardRecords, image_record
from pipelines.evaluation.report import metric_rows
from pipelines.evaluation.split import read_split
from pipelines.inference.loader import load_inference
from storage.shards import read_table
from tests.factories import NAMES
from tests.pipelines.generation.conftest import entity_split, trained_root  # noqa: F401  (shared fixtures)

CAPTIONS = {"a": "a photo of the zozo on sand", "b": "a dopzozo pictured on sand",
            "c": "zozo, sand backdrop", "d": "the velta emblem on sand", "e": "the zozo on grass"}
SHA = {"a": "s-a", "b": "s-b", "c": "s-c", "d": "s-d", "e": "s-e"}


def test_oracle_names_the_entity_as_a_word_and_never_the_own_document():
    docs = EntityDocs(CAPTIONS, SHA)
    for pos in range(20):
        got = docs.oracle("zozo", "s-a", pos, 2, set())
        assert sorted(got) == ["c", "e"]  # "a" is the query's own image; "dopzozo" is another
    assert docs.oracle("zozo", "", 0, 5, set()) != [] and len(docs.oracle("zozo", "", 0, 2, set())) == 2
    assert docs.oracle("zozo", "s-a", 0, 2, {"c"}) == ["e"]  # guarded near-duplicates stay out
    assert docs.oracle("velta", "s-x", 0, 2, set()) == ["d"]
    assert docs.oracle("nobody", "", 0, 2, set()) == []
    assert {tuple(docs.oracle("zozo", "", p, 2, set())) for p in range(20)} != {("a", "c")}  # seeded order


def test_same_entity_rates_at_rank_1_and_any():
    recs = [{"same_entity": {"caption": [True, False], "image": [False, False]}},
            {"same_entity": {"caption": [False, True], "image": []}}, {"same_entity": {}}]
    assert same_entity_rates(recs) == {
        "caption_query": {"rank1": 50.0, "any": 100.0, "images": 2},
        "image_query": {"rank1": 0.0, "any": 0.0, "images": 2}}
    assert same_entity_rates([{"same_entity": {}}]) == {}


def test_context_setting_is_checked_and_random_context_folds_in():
    assert EvaluateConfig(random_context=True).context == "random"
    assert EvaluateConfig().context == "retrieved"
    with pytest.raises(ConfigError, match="evaluate.context"):
        EvaluateConfig(context="best")
    with pytest.raises(ConfigError, match="evaluate.random_context"):
        EvaluateConfig(context="oracle", random_context=True)


def memory_split(root, with_entities: bool = True) -> str:
    """A COCO split whose images are byte for byte memory documents 0..3 (their own documents
    are in the memory), labelled with their entities."""
    t = read_table(root, root.artifact("download", "00000", "parquet"), ["key", "jpg"]).to_pydict()
    folder = root.join("coco-own" + ("" if with_entities else "-plain"))
    root.makedirs(folder + "/images")
    images, anns, ents = [], [], {}
    for i in range(4):
        with open(f"{folder}/images/{i}.jpg", "wb") as f:
            f.write(t["jpg"][i])
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "caption": f"a photo of the {NAMES[i]}"})
        ents[str(i)] = NAMES[i]
    data = {"images": images, "annotations": anns} | ({"racm3_entities": ents} if with_entities else {})
    with open(f"{folder}/captions_test.json", "w") as f:
        json.dump(data, f)
    return folder.removeprefix(root.path + "/") + "/captions_test.json"


def test_oracle_context_in_evaluation_gives_same_entity_documents_never_the_own(trained_root):  # noqa: F811
    setup = load_inference(trained_root, ("ra-cm3", "vanilla"))
    items, _ = read_split(trained_root, memory_split(trained_root))
    own = {it.position: f"{it.position:09d}" for it in items}  # download rows i: key i, entity i
    cfg = EvaluateConfig(context="oracle", k=2)
    for ex in prepare(setup, items, cfg, excluded=set()):  # no guard: the own-document rule alone
        ent = ex.item.entity
        assert ex.by_caption and ex.by_caption == ex.by_image, ex.by_caption
        assert own[ex.item.position] not in ex.by_caption
        assert all(f"the {ent}" in setup.captions[k] for k in ex.by_caption)
        assert ex.same_entity["caption"] == [True] * len(ex.by_caption)
    # retrieved context for the same split is another list (the control changes what is used)
    retrieved = prepare(setup, items, EvaluateConfig(k=2), excluded=set())
    assert [ex.by_caption for ex in retrieved] != [ex.by_caption for ex in
                                                   prepare(setup, items, cfg, excluded=set())]


def test_oracle_on_a_split_without_entities_is_refused_at_plan_time(trained_root):  # noqa: F811
    cfg = EvaluateConfig(context="oracle", coco=memory_split(trained_root, with_entities=False))
    with pytest.raises(ConfigError, match="evaluate.context.*racm3_entities"):
        EvaluatePartStage().plan(trained_root, cfg)


def test_a_caption_names_the_entity_as_a_word():
    assert names_entity("A photo of the Zozo.", "zozo") and names_entity("zozo, sand backdrop", "zozo")
    assert not names_entity("a dopzozo pictured on sand", "zozo") and not names_entity("", "zozo")


def records(hits: dict[str, list[bool | None]]) -> ShardRecords:
    """Hand-made evaluation records: per model, whether each image's caption names its entity
    (None: the image has no entity, as off the demo)."""
    n = len(next(iter(hits.values())))
    images = [{"refs": ["the zozo on sand"], "clip": {}, "nll": {},
               "captions": {m: ("the zozo" if h[i] else "the velta") for m, h in hits.items()},
               "caption_entity": {m: h[i] for m, h in hits.items() if h[i] is not None}}
              for i in range(n)]
    return ShardRecords(images, {}, {}, {}, [], "FID-EffNetLite0")


def test_same_entity_rate_of_generated_captions_has_the_known_answer_and_an_interval():
    part = records({"ra-cm3": [True, True, True, False, None],
                    "vanilla": [True, False, False, False, None],
                    "retrieval-baseline": [True, True, False, False, None]})
    assert list(caption_entity_rate(part.images, "vanilla")[:4]) == [1.0, 0.0, 0.0, 0.0]
    out = compute(part, 200, 0)
    assert out["models"]["ra-cm3"][CAPTION_ENTITY] == 75.0  # 3 of the 4 images with an entity
    assert out["models"]["vanilla"][CAPTION_ENTITY] == 25.0
    assert out["models"]["retrieval-baseline"][CAPTION_ENTITY] == 50.0
    lo, hi = out["intervals"]["ra-cm3"][CAPTION_ENTITY]
    assert lo < 75.0 < hi  # (the bias-shifted percentile interval may pass 100 a little)
    assert out["differences"]["ra-cm3 - vanilla"][CAPTION_ENTITY]["value"] == 50.0
    assert CAPTION_ENTITY not in compute(records({"ra-cm3": [None, None]}), 0, 0)["models"]["ra-cm3"]
    header, rows = metric_rows(out)
    assert any(r[0] == f"{CAPTION_ENTITY} ↑" and r[1].startswith("75 [") for r in rows), rows


def test_evaluation_records_whether_each_generated_caption_names_the_entity(trained_root, entity_split):  # noqa: F811
    setup = load_inference(trained_root, ("ra-cm3", "vanilla"))
    items, _ = read_split(trained_root, entity_split)
    cfg = EvaluateConfig(k=2, image_samples=1, caption_samples=2, max_caption_tokens=6)
    for ex in prepare(setup, items, cfg, excluded=set()):
        run_example(setup, ex, cfg)
        assert set(ex.caption_entity) == set(ex.captions) == {"ra-cm3", "vanilla", "retrieval-baseline"}
        for m, cap in ex.captions.items():
            assert ex.caption_entity[m] == (ex.item.entity in cap.replace(",", " ").split())
        # the baseline's caption is the image query's top document: the context rate's rank 1
        assert ex.caption_entity["retrieval-baseline"] == ex.same_entity["image"][0]
        assert image_record(ex)["caption_entity"] == ex.caption_entity


def test_guidance_weight_is_checked_and_changes_evaluation_sampling(trained_root, entity_split):  # noqa: F811
    with pytest.raises(ConfigError, match="evaluate.guidance"):
        EvaluateConfig(guidance=-1.0)
    setup = load_inference(trained_root, ("ra-cm3", "vanilla"))
    items, _ = read_split(trained_root, entity_split)

    def kept(w: float) -> list[np.ndarray]:
        cfg = EvaluateConfig(k=2, image_samples=2, guidance=w)
        out = []
        for ex in prepare(setup, items, cfg, excluded=set()):
            for m in ("ra-cm3", "vanilla"):
                caption_to_image(setup, ex, m, cfg, torch.Generator().manual_seed(ex.item.position))
                out.append(np.asarray(ex.images[m]))
        return out

    plain, again, guided = kept(0.0), kept(0.0), kept(3.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(plain, guided, strict=True))
