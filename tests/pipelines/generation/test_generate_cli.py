"""`racm3 generate` on a tiny trained data root: caption -> image, image -> caption, infilling and
named context, each writing its files and a self-contained page."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from pipelines.generation.request import Request, run
from pipelines.inference.loader import load_inference
from tests.factories import entity_image


@pytest.fixture()
def prompt_image(tmp_path) -> str:
    path = str(tmp_path / "prompt.png")
    entity_image(1, 64, seed=77).save(path)
    return path


def run_cli(root, *args: str) -> dict:
    out = args[args.index("--out") + 1]
    assert main(["generate", "--data-root", root.path, *args]) == 0
    return json.load(open(os.path.join(out, "result.json")))


def test_caption_to_image_retrieves_with_the_caption_and_writes_a_page(trained_root, tmp_path, capsys):
    out = str(tmp_path / "t2i")
    rec = run_cli(trained_root, "--caption", "a photo of the thing", "--samples", "3", "--out", out,
                  "--seed", "1")
    assert rec["mode"] == "caption-to-image" and len(rec["files"]) == 3
    assert rec["scores"] == sorted(rec["scores"], reverse=True)  # CLIP-reranked, best first
    assert 1 <= len(rec["context"]) <= 2  # up to k=2 retrieved by the caption (redundancy rules)
    page = open(os.path.join(out, "index.html")).read()
    assert page.count("data:image/png;base64,") == 3 + len(rec["context"])  # outputs + context
    assert "page:" in capsys.readouterr().out


def test_guided_and_ensembled_caption_to_image(trained_root, tmp_path):
    guided = run_cli(trained_root, "--caption", "a photo", "--samples", "2", "--guidance", "2",
                     "--doc-guidance", "1", "--out", str(tmp_path / "g"))
    assert len(guided["files"]) == 2 and guided["request"]["guidance_caption"] == 2
    # named documents: the test CLIP is random, so the redundancy rules keep few retrieved ones
    keys = sorted(load_inference(trained_root).memory)[:4]
    ens = run_cli(trained_root, "--caption", "a photo", "--samples", "2", "--ensemble", "4",
                  "--context", *keys, "--out", str(tmp_path / "e"))
    assert ens["context"] == keys and len(ens["files"]) == 2  # 4 documents: two passes
    assert main(["generate", "--data-root", trained_root.path, "--caption", "x", "--ensemble", "4",
                 "--guidance", "1", "--out", str(tmp_path / "bad")]) == 2


def test_set_retrieve_changes_what_generate_retrieves(trained_root, tmp_path, capsys):
    def context(*sets: str) -> list[str]:
        args = [x for s in sets for x in ("--set", s)]
        return run_cli(trained_root, "--caption", "a photo of the thing", "--samples", "1", "--k", "2",
                       "--out", str(tmp_path / f"r{len(os.listdir(tmp_path))}"), *args)["context"]

    # nothing is too similar: the two best candidates; everything is: only the best one
    loose = context("retrieve.redundancy_threshold=1.5", "retrieve.query_sim_threshold=1.5")
    strict = context("retrieve.redundancy_threshold=-1.5", "retrieve.query_sim_threshold=1.5")
    assert len(loose) == 2 and strict == loose[:1]
    # validated as the retrieve section is, and the index's encoder cannot be swapped
    for bad, field in (("retrieve.top_n=x", "retrieve.top_n"), ("retrieve.nope=1", "retrieve.nope"),
                       ("embed.model=ViT-L-14", "embed.model"), ("train.alpha=1", "train.alpha")):
        capsys.readouterr()
        assert main(["generate", "--data-root", trained_root.path, "--caption", "x", "--set", bad,
                     "--out", str(tmp_path / "bad")]) == 2
        assert field in capsys.readouterr().err


def test_image_to_caption_and_named_context(trained_root, tmp_path, prompt_image):
    bench = load_inference(trained_root)
    keys = sorted(bench.memory)[:1]
    out = str(tmp_path / "i2t")
    rec = run_cli(trained_root, "--image", prompt_image, "--samples", "2", "--context", *keys,
                  "--out", out, "--max-caption-tokens", "4")
    assert rec["mode"] == "image-to-caption" and rec["context"] == keys
    assert len(rec["captions"]) == 2 and rec["scores"] == sorted(rec["scores"])  # perplexity


def test_infill_keeps_the_unmasked_tokens_of_the_prompt_image(trained_root, tmp_path, prompt_image):
    out = str(tmp_path / "infill")
    rec = run_cli(trained_root, "--infill", "1,1,3,3", "--image", prompt_image, "--caption",
                  "a photo", "--samples", "2", "--out", out, "--context-image", prompt_image,
                  "--context-caption", "the same thing")
    assert rec["mode"] == "infill" and rec["context"] == ["user: prompt.png"]
    bench = load_inference(trained_root)
    given = np.asarray(bench.encode_images([Image.open(prompt_image)])[0])
    inside = np.zeros((4, 4), bool)
    inside[1:3, 1:3] = True
    # the same request through the library the command calls, with a named memory document
    ranked, _, _ = run(bench, Request(caption="a photo", image=prompt_image, box="1,1,3,3",
                                      samples=2, context_keys=(sorted(bench.memory)[0],)))
    for codes in ranked.codes:
        assert (np.asarray(codes)[~inside.reshape(-1)] == given[~inside.reshape(-1)]).all()


def test_bad_requests_exit_2(trained_root, tmp_path, prompt_image):
    out = str(tmp_path / "bad")
    assert main(["generate", "--data-root", trained_root.path, "--out", out]) == 2
    assert main(["generate", "--data-root", trained_root.path, "--infill", "0,0,9,9", "--image",
                 prompt_image, "--caption", "x", "--out", out]) == 2
    assert main(["generate", "--data-root", trained_root.path, "--caption", "x", "--context",
                 "no-such-key", "--out", out]) == 2


def test_classify_reports_accuracy_vs_k_for_both_variants(trained_root, entity_split, tmp_path, capsys):
    coco = entity_split
    out = str(tmp_path / "fewshot.json")
    assert main(["classify", "--data-root", trained_root.path, "--coco", coco, "--tasks", "3",
                 "--ks", "0,1,2", "--out", out]) == 0
    res = json.load(open(out))
    assert res["split"] == coco and res["queries"] == 6
    for variant in ("ra-cm3", "vanilla"):
        for labels in ("semantic", "non-semantic"):
            accs = res["accuracy"][variant][labels]
            assert set(accs) == {"0", "1", "2"} and all(0 <= a <= 1 for a in accs.values())
    assert "| vanilla | non-semantic |" in capsys.readouterr().out


def test_classify_refuses_a_split_without_entity_labels(trained_root, tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    assert main(["classify", "--data-root", trained_root.path, "--coco", str(path)]) == 2


def test_showcase_writes_pictures_and_numbers(trained_root, entity_split, tmp_path):
    out = str(tmp_path / "show")
    assert main(["showcase", "--data-root", trained_root.path, "--coco", entity_split,
                 "--images", "3", "--samples", "1", "--weights", "0,2", "--out", out]) == 0
    res = json.load(open(os.path.join(out, "showcase.json")))
    assert res["images"] == 3 and set(res["guidance"]) == {"ra-cm3", "vanilla"}
    assert set(res["guidance"]["vanilla"]) == {"0", "2"}
    assert all(0 <= v <= 1 for v in res["infill_box_token_match"].values())
    for name in ("infill.png", "guidance.png"):
        assert Image.open(os.path.join(out, name)).width > 100
