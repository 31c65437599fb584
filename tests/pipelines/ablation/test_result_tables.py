"""Issue 19's result tables: the seeds table's control rows (oracle, random beside retrieved) and
novel-entity section, the control evaluations on a real trained root (named, resumable), the
guidance rows (trained once, evaluated per weight) and the novel-entity table."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest

from flows.ablate import collect
from pipelines.ablation.controls import controls_markdown, evaluate_control
from pipelines.ablation.guidance_table import guidance_markdown
from pipelines.ablation.novel_table import novel_markdown, novel_seeds_markdown
from pipelines.ablation.run import ablate, child_root, copy_root
from pipelines.ablation.variants import select
from pipelines.evaluation.metrics import CAPTION_ENTITY
from pipelines.training.train import TrainConfig
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.ablation.test_ablate import with_entities
from tests.pipelines.evaluation.test_evaluate import EVAL, TRAIN, trained  # noqa: F401  (fixture)
from tests.pipelines.retrieval.retrieval_helpers import configs

FID, KID = "FID-EffNetLite0", "KID(EffNetLite0)"


def metrics(x: float, rank1: float = 50.0) -> dict:
    """An evaluation's metrics.json as the evaluate stage writes it, every number derived from x."""
    models = {"ra-cm3": {"image ppl": 2 * x, "CLIP-score": x / 10, FID: 30 * x, KID: x / 100,
                         "CIDEr-D": 10 * x, CAPTION_ENTITY: 40 * x},
              "vanilla": {"image ppl": 3.0, "CLIP-score": 0.3, FID: 31.0, KID: 0.011,
                          "CIDEr-D": 12.0, CAPTION_ENTITY: 20.0},
              "retrieval-baseline": {"CLIP-score": 0.5, FID: 25.0, KID: 0.01, "CIDEr-D": 200.0,
                                     CAPTION_ENTITY: 60.0}}
    iv = {m: {k: [v * 0.9, v * 1.1] for k, v in d.items()} for m, d in models.items()}
    diff = {k: {"value": models["ra-cm3"][k] - v, "lo": models["ra-cm3"][k] - v - 0.1,
                "hi": models["ra-cm3"][k] - v + 0.1, "separates": abs(models["ra-cm3"][k] - v) > 0.1}
            for k, v in models["vanilla"].items()}
    return {"models": models, "intervals": iv, "differences": {"ra-cm3 - vanilla": diff},
            "context_same_entity": {"caption_query": {"rank1": rank1, "any": rank1, "images": 4}},
            "settings": {"images": 4}}


def write_metrics(root: DataRoot, name: str, m: dict) -> None:
    root.write_bytes_atomic(root.artifact("evaluate", name, "metrics.json"), json.dumps(m).encode())


def test_seeds_table_shows_the_controls_beside_retrieved_and_the_novel_entities():
    base = DataRoot(f"memory://racm3-seeds-{uuid.uuid4().hex[:8]}/data")
    for s, x in ((0, 1.0), (1, 2.0), (2, 3.0)):
        root = child_root(base, f"seed-{s}")
        write_metrics(root, "main", metrics(x, rank1=90.0))
        write_metrics(root, "oracle", metrics(x / 2, rank1=100.0))
        write_metrics(root, "random", metrics(2 * x, rank1=5.0))
        if s < 2:
            write_metrics(root, "novel", metrics(x + 1))
        for w in (0, 3):  # `racm3 ablate --only guidance-w3` on the seed root
            write_metrics(root, f"guidance_w{w}", metrics(x + w))
    summary = collect(base, [0, 1, 2])
    md = base.fs.read_text(base.join("seeds.md"))
    assert md == summary["markdown"] and "## Controls" in md and "## Novel entities (seeds 0, 1)" in md
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in md.splitlines()
            if line.startswith("| RA-CM3") or line.startswith("| vanilla CM3 (no")}
    # image ppl (2x) and the context rate, mean ± sd over the 3 seeds, per context
    assert rows["RA-CM3, retrieved context"][0] == "4 ± 2" and rows["RA-CM3, retrieved context"][-1] == "90 ± 0 |"
    assert rows["RA-CM3, oracle context (same entity)"][0] == "2 ± 1"
    assert rows["RA-CM3, oracle context (same entity)"][-1] == "100 ± 0 |"
    assert rows["RA-CM3, random context"][0] == "8 ± 4" and rows["RA-CM3, random context"][-1] == "5 ± 0 |"
    assert rows["vanilla CM3 (no context)"][-1] == "— |"  # no documents in context
    caption_col = 5  # caption same-entity %: 40x
    assert rows["RA-CM3, oracle context (same entity)"][caption_col] == "40 ± 20"
    saved = json.loads(base.fs.read_text(base.join("seeds.json")))
    assert saved["controls"]["oracle"]["ra-cm3"]["image ppl"]["mean"] == 2.0
    assert saved["novel"]["seeds"] == [0, 1] and saved["seeds"] == [0, 1, 2]
    guidance = md.split("## Guidance as trained for (seeds 0, 1, 2)")[1].splitlines()
    w3 = next(line for line in guidance if line.startswith("| 3 |"))
    assert w3.startswith("| 3 | 0.5 ± 0.1 | 0.3 ± 0 |")  # RA-CM3's CLIP score (x + 3) / 10, vanilla's
    assert not any(line.startswith("| 1 |") for line in guidance)  # w = 1 not evaluated
    assert "(n=2)" in novel_seeds_markdown({0: metrics(2.0), 1: metrics(3.0)})
    assert controls_markdown({0: {"retrieved": metrics(1.0)}}) == ""  # no control evaluated


def test_novel_table_has_every_metric_with_intervals_and_differences():
    md = novel_markdown(metrics(2.0))
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "RA-CM3 (novel memory)" in lines["metric"]
    for label in ("image ppl ↓", "KID ↓", "FID-type ↓", "CLIP score ↑", "CIDEr-D ↑",
                  "caption same-entity % ↑"):
        assert label in lines, label
    assert lines["FID-type ↓"].startswith("| FID-type ↓ | 60 [54, 66] | 31 [27.9, 34.1] | 25 [")
    assert "80 [72, 88]" in lines["caption same-entity % ↑"]  # 40x, with its interval
    assert "| 60 [59.9, 60.1] * |" in lines["caption same-entity % ↑"]  # RA - vanilla, separated
    assert lines["image ppl ↓"].split(" | ")[3] == "—"  # the baseline has no perplexity


def test_guidance_rows_share_one_training_and_tabulate_clip_and_fid_per_weight():
    vs = select("guidance-w1,guidance-w3")
    assert [v.name for v in vs] == ["ra-cm3", "guidance-w0", "guidance-w1", "guidance-w3"]
    w0, w1, w3 = vs[1:]
    assert w0.train == w0.train_vanilla == {"caption_dropout": 0.1}  # both models, once
    assert w1.train is None and (w1.ra, w1.vanilla) == ("guidance-w0", "guidance-w0-vanilla")
    assert [v.evaluate for v in vs[1:]] == [{"guidance": w, "generate": True} for w in (0.0, 1.0, 3.0)]
    md = guidance_markdown(vs, {"guidance-w0": metrics(1.0), "guidance-w3": metrics(3.0)})
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert "RA-CM3 CLIP-score" in rows[0] and f"vanilla {FID}" in rows[0]
    assert rows[1].startswith("| 0 | 0.1 [0.09, 0.11] | 0.3 [")
    assert rows[2].startswith("| 3 | 0.3 [0.27, 0.33] |") and len(rows) == 3  # w = 1 not evaluated
    assert guidance_markdown(select("k-1"), {"k-1": metrics(1.0)}) == ""


def test_control_evaluations_are_named_and_resumable(trained, tmp_path):  # noqa: F811
    root = DataRoot(str(tmp_path / "data"))  # a copy: the module's root stays without entities
    copy_root(trained, root, skip=frozenset({"ablate", "evaluate", "evaluate-part"}))
    with_entities(root)
    cfgs = configs(evaluate=dataclasses.replace(EVAL, bootstrap=20, shard_images=2))
    oracle, ran = evaluate_control(root, cfgs, "oracle")
    assert ran == 3 and oracle["settings"]["context"] == "oracle"  # 2 parts + the reduce
    part = json.loads(root.fs.read_text(root.artifact("evaluate-part", "oracle-000000-000002", "json")))
    hits = [h for rec in part["images"] for h in rec["same_entity"]["caption"]]
    assert hits and all(hits)  # every oracle document names the image's entity
    assert CAPTION_ENTITY in oracle["models"]["ra-cm3"]
    assert read_manifest(root, "evaluate", "oracle") is not None
    assert evaluate_control(root, cfgs, "oracle")[1] == 0  # a rerun skips what is done
    random, ran = evaluate_control(root, cfgs, "random")
    assert ran == 3 and random["settings"]["context"] == "random"


@pytest.mark.slow
def test_guidance_rows_train_once_and_evaluate_per_weight(trained):  # noqa: F811
    root = DataRoot(f"memory://racm3-guidance-{uuid.uuid4().hex[:8]}/data")
    copy_root(trained, root, skip=frozenset({"ablate", "evaluate", "evaluate-part"}))
    cfgs = configs(train=TrainConfig(**TRAIN),
                   evaluate=dataclasses.replace(EVAL, bootstrap=20, shard_images=0))
    table = ablate(root, cfgs, only="guidance-w3")
    assert [r["variant"] for r in table] == ["ra-cm3", "guidance-w0", "guidance-w3"]
    for name in ("guidance-w0", "guidance-w0-vanilla"):
        m = read_manifest(root, "train", name)
        assert m is not None and m.params["caption_dropout"] == 0.1, name
    assert read_manifest(root, "train", "guidance-w0-vanilla").params["variant"] == "vanilla"
    w3 = json.loads(root.fs.read_text(root.artifact("evaluate", "guidance_w3", "metrics.json")))
    assert w3["settings"]["checkpoints"] == {"ra-cm3": "guidance-w0", "vanilla": "guidance-w0-vanilla"}
    assert "CLIP-score" in w3["models"]["ra-cm3"] and "CLIP-score" in w3["models"]["vanilla"]
    md = root.fs.read_text(root.join("ablate", "guidance.md"))
    assert "| 0 |" in md and "| 3 |" in md
