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
from pipelines.generation.workbench import load_workbench
from tests.factories import NAMES, entity_image


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


def test_image_to_caption_and_named_context(trained_root, tmp_path, prompt_image):
    bench = load_workbench(trained_root)
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
    bench = load_workbench(trained_root)
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


def write_entity_split(root, n: int = 4) -> str:
    """A COCO split with racm3_entities: one new rendering of each of entities 0..n-1."""
    folder = root.join("coco-test")
    root.makedirs(folder + "/images")
    images, anns, names = [], [], {}
    for i in range(n):
        entity_image(i, 64, seed=900 + i).save(f"{folder}/images/{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "caption": f"a photo of the {NAMES[i]}"})
        names[str(i)] = NAMES[i]
    with open(f"{folder}/captions_test.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "racm3_entities": names}, f)
    return "coco-test/captions_test.json"


def test_classify_reports_accuracy_vs_k_for_both_variants(trained_root, tmp_path, capsys):
    coco = write_entity_split(trained_root)
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
