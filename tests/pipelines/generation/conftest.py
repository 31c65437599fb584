"""A tiny trained data root (fit-vqgan, tokenize, embed, index, retrieve, both variants trained a
few steps) shared by the generation tests, as tests/pipelines/evaluation builds it."""

from __future__ import annotations

import pytest
import torch

from pipelines.core.registry import STAGES
from pipelines.core.runner import run_stage
from pipelines.demo.fit_vqgan import FitVQGANConfig
from pipelines.tokens.tokenize import TokenizeConfig
from pipelines.training.train import TrainConfig
from storage.fs import DataRoot
from tests.factories import make_download_shard
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
    cfgs = configs(fit_vqgan=FIT, tokenize=TOK)
    upstream = ("fit-vqgan", "tokenize", "embed", "index", "retrieve", "pack")
    for stage in (s for s in upstream if s in STAGES):  # `pack` where training reads packed shards
        assert run_stage(stage, root, cfgs).ok, stage
    for variant in ("ra-cm3", "vanilla"):
        cfgs["train"] = TrainConfig(variant=variant, **TRAIN)
        assert run_stage("train", root, cfgs).ok, variant
    torch.set_num_threads(before)
    return root
