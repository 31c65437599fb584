"""A tiny trained data root (fit-vqgan, tokenize, embed, index, retrieve, both variants trained a
few steps) shared by the generation tests, as tests/pipelines/evaluation builds it."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.core.registry import STAGES
from pipelines.core.runconfig import BeamConfig
from pipelines.core.runner import run_stage
from pipelines.demo.fit_vqgan import FitVQGANConfig
from pipelines.tokens.tokenize import TokenizeConfig
from pipelines.training.train import TrainConfig
from storage.fs import DataRoot
from tests.factories import NAMES, entity_image, make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint

FIT = FitVQGANConfig(image_size=16, factor=4, codebook_size=16, channels=8, embed_dim=4,
                     max_steps=2, batch_size=8, bpe_vocab_size=64, threads=1)
TOK = TokenizeConfig(image_size=16, factor=4, codebook_size=16, batch_size=8)
TRAIN = dict(max_steps=3, batch_size=2, warmup_steps=1, progress_bar=False, log_every=1,
             accelerator="cpu", threads=1)


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory) -> DataRoot:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = DataRoot(str(tmp_path_factory.mktemp("generation") / "data"))
    write_checkpoint(root)
    make_download_shard(root, "00000", n=8, size=64)
    make_download_shard(root, "00001", n=8, start=8, size=64)
    # Beam stages in memory: worker processes would cost more than the work on a few documents
    cfgs = configs(fit_vqgan=FIT, tokenize=TOK,
                   beam=BeamConfig(direct_num_workers=1, direct_running_mode="in_memory"))
    upstream = ("fit-vqgan", "tokenize", "embed", "index", "retrieve", "pack")
    for stage in (s for s in upstream if s in STAGES):  # `pack` where training reads packed shards
        assert run_stage(stage, root, cfgs).ok, stage
    for variant in ("ra-cm3", "vanilla"):
        cfgs["train"] = TrainConfig(variant=variant, **TRAIN)
        assert run_stage("train", root, cfgs).ok, variant
    torch.set_num_threads(before)
    return root


@pytest.fixture(scope="session")
def entity_split(trained_root) -> str:
    """A COCO split with racm3_entities: one new rendering of each of entities 0..3."""
    folder = trained_root.join("coco-test")
    trained_root.makedirs(folder + "/images")
    images, anns, names = [], [], {}
    for i in range(4):
        entity_image(i, 64, seed=900 + i).save(f"{folder}/images/{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "caption": f"a photo of the {NAMES[i]}"})
        names[str(i)] = NAMES[i]
    with open(f"{folder}/captions_test.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "racm3_entities": names}, f)
    return "coco-test/captions_test.json"
