"""Behaviour fingerprint of a tiny trained root: generated samples for fixed seeds, evaluation
metrics, held-out perplexities and a freshly trained checkpoint's weights, written as JSON so a
refactor can be checked for identical results (`python -m benchmarks.behaviour_fingerprint OUT`).

The tiny root (the generation tests' set-up) is built once under $FP_ROOT and copied per run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch

BASE = os.environ.get("FP_ROOT", "/tmp/inference_fp/base")


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def build(path: str) -> None:
    from pipelines.core.registry import STAGES
    from pipelines.core.runconfig import BeamConfig
    from pipelines.core.runner import run_stage
    from pipelines.training.train import TrainConfig
    from storage.fs import DataRoot
    from storage.shards import read_table
    from tests.factories import make_download_shard
    from tests.pipelines.evaluation.test_evaluate import write_coco
    from tests.pipelines.generation.conftest import FIT, TOK, TRAIN
    from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint

    root = DataRoot(path)
    write_checkpoint(root)
    make_download_shard(root, "00000", n=8, size=64)
    make_download_shard(root, "00001", n=8, start=8, size=64)
    cfgs = configs(fit_vqgan=FIT, tokenize=TOK,
                   beam=BeamConfig(direct_num_workers=1, direct_running_mode="in_memory"))
    for stage in (s for s in ("fit-vqgan", "tokenize", "embed", "index", "retrieve", "pack") if s in STAGES):
        assert run_stage(stage, root, cfgs).ok, stage
    for variant in ("ra-cm3", "vanilla"):
        cfgs["train"] = TrainConfig(variant=variant, holdout_fraction=0.25, **TRAIN)
        assert run_stage("train", root, cfgs).ok, variant
    memory_jpg = read_table(root, root.artifact("download", "00001", "parquet"))["jpg"][0].as_py()
    write_coco(root, planted_jpg=memory_jpg)


def gen(root_path: str, out: str, *args: str) -> dict:
    from flows.cli import main

    assert main(["generate", "--data-root", root_path, "--out", out, *args]) == 0
    rec = json.load(open(os.path.join(out, "result.json")))
    files = {os.path.basename(f): digest(open(os.path.join(out, os.path.basename(f)), "rb").read())
             for f in rec["files"]}
    return {"context": rec["context"], "captions": rec["captions"], "scores": rec["scores"],
            "files": files}


def fingerprint(work: str) -> dict:
    from pipelines.core.runner import run_stage
    from pipelines.evaluation.perplexity import compare_variants
    from pipelines.training.train import TrainConfig
    from storage.fs import DataRoot
    from tests.pipelines.evaluation.test_evaluate import EVAL, run_evaluation
    from tests.pipelines.generation.conftest import TRAIN
    from tests.pipelines.retrieval.retrieval_helpers import configs

    torch.set_num_threads(1)
    path = os.path.join(work, "data")
    shutil.copytree(BASE, path)
    root = DataRoot(path)
    prompt = os.path.join(work, "prompt.png")
    from tests.factories import entity_image
    entity_image(1, 64, seed=77).save(prompt)
    out: dict = {}
    g = os.path.join(work, "gen")
    out["t2i"] = gen(path, g + "1", "--caption", "a photo of the thing", "--samples", "3", "--seed", "1")
    out["t2i_guided"] = gen(path, g + "2", "--caption", "a photo", "--samples", "2", "--guidance", "2",
                            "--doc-guidance", "1")
    out["i2t"] = gen(path, g + "3", "--image", prompt, "--samples", "3", "--seed", "2")
    out["infill"] = gen(path, g + "4", "--image", prompt, "--caption", "a photo", "--infill", "0,0,2,2",
                        "--samples", "2")
    out["ensemble"] = gen(path, g + "5", "--caption", "a photo", "--samples", "2", "--ensemble", "2")
    out["vanilla_t2i"] = gen(path, g + "6", "--caption", "a photo", "--variant", "vanilla", "--k", "0",
                             "--samples", "2")
    out["heldout"] = compare_variants(root)
    metrics = run_evaluation(root, EVAL)
    out["metrics"] = {"models": metrics["models"], "differences": metrics["differences"],
                      "intervals": metrics["intervals"]}
    cfgs = configs()
    cfgs["train"] = TrainConfig(variant="ra-cm3", name="fp", **TRAIN)
    assert run_stage("train", root, cfgs).ok
    ckpt = torch.load(root.artifact("train", "fp", "pt"), map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    out["train_fp"] = {k: digest(v.numpy().tobytes()) for k, v in sorted(state.items())
                       if isinstance(v, torch.Tensor)} if isinstance(state, dict) else str(type(state))
    return out


def main() -> None:
    if not os.path.exists(BASE):
        build(BASE)
    work = sys.argv[2] if len(sys.argv) > 2 else "/tmp/inference_fp/run"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    result = fingerprint(work)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=lambda v: float(v) if isinstance(v, np.floating) else str(v))


if __name__ == "__main__":
    main()
