"""fit-vqgan on generated download shards: artifacts, manifest metrics, per-artifact fingerprints."""

import dataclasses

import pytest

from model.text_tokenizer import BPETokenizer
from model.vqgan import load_checkpoint
from pipelines.fit_vqgan import FitVQGANConfig, FitVQGANStage, is_holdout
from pipelines.runconfig import BeamConfig, RunConfig
from pipelines.runner import run_stage
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.factories import make_download_shard

TINY = FitVQGANConfig(image_size=16, factor=4, codebook_size=16, channels=8, embed_dim=4,
                      max_steps=3, batch_size=8, holdout_fraction=0.2, bpe_vocab_size=64, threads=1)


def cfgs(fit: FitVQGANConfig) -> dict:
    return {"fit_vqgan": fit, "run": RunConfig(retries=0), "beam": BeamConfig()}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> DataRoot:
    root = DataRoot(str(tmp_path_factory.mktemp("fit")))
    make_download_shard(root, "00000", n=24, failures=2, size=64)
    make_download_shard(root, "00001", n=16, start=24, size=64)
    report = run_stage("fit-vqgan", root, cfgs(TINY))
    assert report.ok, report.failed
    return root


def test_writes_checkpoint_with_heldout_metrics(fitted):
    m = read_manifest(fitted, "fit-vqgan", "vqgan")
    assert m.metrics["steps"] == 3 and m.metrics["grid"] == 4
    assert 0 < m.metrics["heldout_psnr_db"] < 60
    assert 1 <= m.metrics["codebook_used"] <= 16 and 0 < m.metrics["codebook_usage"] <= 1
    assert m.metrics["heldout_images"] + m.metrics["train_images"] == 40
    model = load_checkpoint(fitted.artifact("fit-vqgan", "vqgan", "ckpt"))
    assert model.cfg.n_embed == 16 and model.cfg.factor == 4 and model.cfg.resolution == 16


def test_bpe_fitted_on_captions(fitted):
    tok = BPETokenizer(fitted.artifact("fit-vqgan", "bpe", "json"))
    assert tok.vocab_size <= 64
    assert tok.decode(tok.encode("a photo of the zorvik")) == "a photo of the zorvik"
    assert read_manifest(fitted, "fit-vqgan", "bpe").metrics["n_text"] == tok.vocab_size


def test_rerun_skips_and_bpe_change_refits_only_bpe(fitted):
    assert sorted(run_stage("fit-vqgan", fitted, cfgs(TINY)).skipped) == ["bpe", "vqgan"]
    report = run_stage("fit-vqgan", fitted, cfgs(dataclasses.replace(TINY, bpe_vocab_size=80)))
    assert report.ran == ["bpe"] and report.skipped == ["vqgan"]


def test_holdout_split_is_stable():
    keys = [f"{i:09d}" for i in range(2000)]
    held = [k for k in keys if is_holdout(k, 0.1)]
    assert 150 < len(held) < 250 and held == [k for k in keys if is_holdout(k, 0.1)]


def test_config_refuses_bad_values():
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="fit_vqgan.factor"):
        FitVQGANConfig(factor=3)
    with pytest.raises(ConfigError, match="fit_vqgan.image_size"):
        FitVQGANConfig(image_size=30, factor=4)


def test_no_downloads_plans_nothing(tmp_path):
    assert FitVQGANStage().plan(DataRoot(str(tmp_path)), TINY) == []
