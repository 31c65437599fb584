"""Controls that isolate retrieval: oracle context (memory documents of the query's entity, never
its own document nor a guarded near-duplicate), random context, and `evaluate.context`'s checks."""

from __future__ import annotations

import json

import pytest

from pipelines.core.config import ConfigError
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.controls import EntityDocs, same_entity_rates
from pipelines.evaluation.evaluate import EvaluatePartStage
from pipelines.evaluation.per_image import prepare
from pipelines.evaluation.split import read_split
from pipelines.inference.loader import load_inference
from storage.shards import read_table
from tests.factories import NAMES
from tests.pipelines.generation.conftest import trained_root  # noqa: F401  (the shared fixture)

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
