"""`racm3 ablate` (flows/ablate.py): every Table 5 / Table 6 / Fig 9 variant trains its own
checkpoint and is evaluated on a tiny config; the table sits beside the paper's numbers."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from flows.ablate import VARIANTS, ablate, direction, markdown, rows, select
from pipelines.training.train import TrainConfig
from storage.manifest import read_manifest
from tests.pipelines.evaluation.test_evaluate import EVAL, TRAIN, trained  # noqa: F401  (fixture)
from tests.pipelines.retrieval.retrieval_helpers import configs


def test_rows_judge_directions_against_the_reference_row():
    vs = select("alpha-0,k-1,k-2,small-ra,small-vanilla")
    res = {"ra-cm3": (10.0, 5.0), "alpha-0": (11.0, 4.0), "k-1": (9.0, 5.0), "k-2": (10.0, 5.0),
           "small-ra": (12.0, 6.0), "small-vanilla": (13.0, 5.5)}
    table = {r["variant"]: r for r in rows(vs, res)}
    assert table["alpha-0"]["image_agrees"] is True and table["alpha-0"]["text_agrees"] is False
    assert table["k-1"]["image_agrees"] is False and table["k-1"]["text_agrees"] is None  # paper: no text
    assert table["small-ra"]["image_agrees"] is True and table["small-ra"]["text_agrees"] is False
    assert table["ra-cm3"].get("image_agrees") is None  # the reference itself
    assert "agree with the paper: 3 of 7" in markdown(list(table.values()))
    assert direction(math.nan, 1.0) == 0
    with pytest.raises(ValueError, match="unknown variants"):
        select("nope")
    # a row that evaluates another row's checkpoint brings that row along
    assert [v.name for v in select("rand-train-retr-infer")] == [
        "ra-cm3", "rand-train-rand-infer", "rand-train-retr-infer"]


@pytest.mark.slow
def test_every_variant_trains_its_own_checkpoint_and_is_evaluated(trained):  # noqa: F811
    cfgs = configs(train=TrainConfig(**TRAIN),
                   evaluate=dataclasses.replace(EVAL, bootstrap=20, shard_images=0))
    table = ablate(trained.join(), cfgs)
    assert [r["variant"] for r in table] == [v.name for v in VARIANTS]
    for v in VARIANTS:
        if v.train is not None:  # its own checkpoint, never train/ra-cm3.pt
            root = trained if v.retrieve is None else type(trained)(trained.join("ablate", "roots", v.name))
            assert read_manifest(root, "train", v.name) is not None, v.name
    for r in table:
        assert r["ours_image_ppl"] > 1 and r["ours_text_ppl"] > 1, r["variant"]
    random = read_manifest(trained, "train", "rand-train-rand-infer")  # also rand-train-retr-infer's
    assert random.params["random_neighbours"] is True  # evaluated despite no index lineage
    out = trained.join("ablate")
    page = open(os.path.join(out, "ablate.report.html")).read()
    assert "<svg" in page and "Random at train &amp; infer" in page
    assert len(json.load(open(os.path.join(out, "table.json")))) == len(VARIANTS)


def test_over_seeds_mean_and_sd():
    from flows.ablate import over_seeds, seeds_markdown

    per = {s: {"models": {"ra-cm3": {"image ppl": v, "perplexity_n": 4}},
               "differences": {"ra-cm3 - vanilla": {"image ppl": {"value": -v / 10,
                                                                   "separates": v > 2}}}}
           for s, v in ((0, 2.0), (1, 4.0), (2, 6.0))}
    out = over_seeds(per)
    assert out["ra-cm3"]["image ppl"] == {"mean": 4.0, "sd": 2.0, "n": 3}
    assert "perplexity_n" not in out["ra-cm3"]
    diff = out["ra-cm3 - vanilla"]["image ppl"]
    assert diff["mean"] == -0.4 and (diff["below_0"], diff["above_0"]) == (2, 0)  # seeds 1 and 2
    text = seeds_markdown(out, [0, 1, 2])
    assert "4 ± 2" in text and "-0.4 ± 0.2 (2↓ 0↑ of 3)" in text
