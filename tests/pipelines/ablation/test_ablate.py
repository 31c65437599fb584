"""Ablations (pipelines/ablation, `racm3 ablate`): every Table 5 / Table 6 / Fig 9 variant trains its
own checkpoint and is evaluated on a tiny config; the table sits beside the paper's numbers; all IO
goes through `DataRoot`, so an ablation runs on an object-store (memory://) root."""

from __future__ import annotations

import dataclasses
import math
import uuid

import pytest

from pipelines.ablation.run import ablate, child_root, copy_root, read_json, write
from pipelines.ablation.table import direction, markdown, rows
from pipelines.ablation.variants import VARIANTS, select
from pipelines.training.train import TrainConfig
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.factories import NAMES
from tests.pipelines.evaluation.test_evaluate import EVAL, TRAIN, trained  # noqa: F401  (fixture)
from tests.pipelines.retrieval.retrieval_helpers import configs


def with_entities(root: DataRoot) -> None:
    """Name each evaluation image's entity, as the demo generator does (`racm3_entities`): images
    0-2 render entities 0-2, image 3 is a copy of memory document 8 (entity 8 % 8 = 0)."""
    import json

    path = root.join("coco", "captions_val.json")
    with open(path) as f:
        data = json.load(f)
    data["racm3_entities"] = {str(im["id"]): NAMES[im["id"] if im["id"] < 3 else 0]
                              for im in data["images"]}
    with open(path, "w") as f:
        json.dump(data, f)


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
    with_entities(trained)  # the oracle control needs each image's entity (demo splits have it)
    cfgs = configs(train=TrainConfig(**TRAIN),
                   evaluate=dataclasses.replace(EVAL, bootstrap=20, shard_images=0))
    table = ablate(trained, cfgs)
    assert [r["variant"] for r in table] == [v.name for v in VARIANTS]
    for v in VARIANTS:
        if v.train is not None:  # its own checkpoint, never train/ra-cm3.pt
            root = trained if v.retrieve is None else child_root(trained, "ablate", "roots", v.name)
            assert read_manifest(root, "train", v.name) is not None, v.name
    for r in table:
        assert r["ours_image_ppl"] > 1 and r["ours_text_ppl"] > 1, r["variant"]
    random = read_manifest(trained, "train", "rand-train-rand-infer")  # also rand-train-retr-infer's
    assert random.params["random_neighbours"] is True  # evaluated despite no index lineage
    page = trained.fs.read_text(trained.join("ablate", "ablate.report.html"))
    assert "<svg" in page and "Random at train &amp; infer" in page
    assert len(read_json(trained, trained.join("ablate", "table.json"))) == len(VARIANTS)


def test_over_seeds_mean_and_sd():
    from pipelines.ablation.seeds import over_seeds, seeds_markdown

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


def memory_root() -> DataRoot:
    return DataRoot(f"memory://racm3-ablate-{uuid.uuid4().hex[:8]}/data")


def test_a_variant_root_is_copied_and_the_table_written_through_data_root():
    base = memory_root()
    for rel in ("train/ra-cm3.pt", "retrieve/000.parquet", "retrieve/000.manifest.json",
                "evaluate/main.metrics.json", "ablate/table.md"):
        base.write_bytes_atomic(base.join(rel), rel.encode())
    top_k = next(v for v in VARIANTS if v.name == "top-k")
    dst = child_root(base, "ablate", "roots", top_k.name)
    assert dst.uri.startswith("memory://") and copy_root(base, dst) == 3
    assert dst.fs.cat(dst.join("retrieve/000.parquet")) == b"retrieve/000.parquet"
    assert not dst.exists(dst.join("evaluate")) and not dst.exists(dst.join("ablate"))
    assert copy_root(base, dst) == 0  # done once: the marker is written last
    table = rows(select("k-1"), {"ra-cm3": (10.0, 5.0), "k-1": (9.0, 5.0)})
    url = write(base, table)
    assert url.startswith("memory://") and url.endswith("ablate/ablate.report.html")
    page = base.fs.read_text(base.join("ablate", "ablate.report.html"))
    assert "K = 1 at inference" in page and "border-collapse" in page  # the evaluation's style
    assert read_json(base, base.join("ablate", "table.json"))[1]["variant"] == "k-1"
    assert "| Table 6 | K = 1 at inference | 9 |" in base.fs.read_text(base.join("ablate", "table.md"))


def test_cli_lists_variants_and_refuses_an_unknown_one(capsys):
    from flows.cli import main

    assert main(["ablate", "--list"]) == 0
    assert "rand-train-rand-infer" in capsys.readouterr().out
    assert main(["ablate", "--only", "nope", "--data-root", memory_root().uri]) == 2
    assert "--only" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_ablation_runs_on_a_memory_root(trained):  # noqa: F811
    root = memory_root()
    copy_root(trained, root, skip=frozenset({"ablate", "evaluate", "evaluate-part"}))
    cfgs = configs(train=TrainConfig(**TRAIN),
                   evaluate=dataclasses.replace(EVAL, bootstrap=20, shard_images=0))
    table = ablate(root, cfgs, only="k-1")
    assert [r["variant"] for r in table] == ["ra-cm3", "k-1"]
    assert all(r["ours_image_ppl"] > 1 and r["ours_text_ppl"] > 1 for r in table)
    assert read_manifest(root, "evaluate", "k_1") is not None  # its own evaluation, in memory://
    assert "K = 1 at inference" in root.fs.read_text(root.join("ablate", "ablate.report.html"))
