"""fit-vqgan on generated download shards: artifacts, manifest metrics, per-artifact fingerprints."""

import dataclasses

import numpy as np
import pytest
import torch

from model.images import to_tensor
from model.text_tokenizer import BPETokenizer
from model.vq.registry import load as load_checkpoint
from model.vqgan import VQGAN
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.runner import run_stage
from pipelines.demo.fit_vqgan import (
    FitVQGANConfig,
    FitVQGANStage,
    assign,
    code_match,
    evaluate,
    fit,
    is_holdout,
    patch_centres,
    patches,
)
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
    assert m.metrics["steps"] == 3 and m.metrics["grid"] == 4 and m.metrics["kmeans_codes"] <= 16
    assert 0 <= m.metrics["heldout_code_match"] <= 1
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
    from pipelines.core.config import ConfigError

    with pytest.raises(ConfigError, match="fit_vqgan.factor"):
        FitVQGANConfig(factor=3)
    with pytest.raises(ConfigError, match="fit_vqgan.image_size"):
        FitVQGANConfig(image_size=30, factor=4)


def test_no_downloads_plans_nothing(tmp_path):
    assert FitVQGANStage().plan(DataRoot(str(tmp_path)), TINY) == []


def token_images(n: int, seed: int) -> np.ndarray:
    """(n, 16, 16, 3) uint8: 4x4 tokens, each one of 4 solid colours (the demo's flag cells)."""
    rng = np.random.default_rng(seed)
    colours = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25)], np.uint8)
    cells = rng.integers(0, 4, size=(n, 4, 4))
    return colours[cells].repeat(4, axis=1).repeat(4, axis=2), cells


def test_patches_are_tokens_in_row_major_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = patches(x, 4)  # (2*2*2, 3*4*4)
    assert p.shape == (8, 48)
    assert torch.equal(p[3].view(3, 4, 4), x[0, :, 4:8, 4:8])  # image 0, token (1, 1)
    assert torch.equal(p[5].view(3, 4, 4), x[1, :, 0:4, 4:8])  # image 1, token (0, 1)


def test_patch_targets_give_one_code_per_colour():
    images, cells = token_images(12, seed=0)
    cfg = dataclasses.replace(TINY, codebook_size=4, kmeans_codes=0, kmeans_iters=10)
    codes = assign(images, patch_centres(images, cfg), 4).numpy()  # (12, 4, 4)
    pairs = set(zip(cells.flatten().tolist(), codes.flatten().tolist(), strict=True))
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4  # a bijection colour <-> code


def test_fit_learns_colour_codes_and_decodes_them():
    """A short fit: the encoder returns each colour's code and the decoder draws the colour back."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, _ = token_images(64, seed=1)
    held, cells = token_images(8, seed=2)
    cfg = dataclasses.replace(TINY, codebook_size=8, kmeans_codes=4, channels=16, max_steps=150, lr=1e-2,
                              warmup_steps=10, max_seconds=60)
    centres = patch_centres(train, cfg)
    model, steps = fit(VQGAN(cfg.vqgan()), train, cfg, centres)
    m = evaluate(model, held)
    assert steps == 150 and m["codebook_used"] == 4 and code_match(model, held, centres) == 1.0
    codes = model.encode(to_tensor(held)).numpy()
    assert len(set(zip(cells.flatten().tolist(), codes.flatten().tolist(), strict=True))) == 4
    assert m["heldout_psnr_db"] > 20, m


def test_same_seed_gives_a_byte_identical_vqgan_and_the_time_limit_fails(tmp_path):
    import hashlib

    digests = []
    for run in ("a", "b"):
        root = DataRoot(str(tmp_path / run))
        make_download_shard(root, "00000", n=24, size=64)
        assert run_stage("fit-vqgan", root, cfgs(TINY)).ok
        digests.append(hashlib.sha256(open(root.artifact("fit-vqgan", "vqgan", "ckpt"), "rb").read()).hexdigest())
        assert read_manifest(root, "fit-vqgan", "vqgan").metrics["steps"] == TINY.max_steps
    assert digests[0] == digests[1]
    images = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)
    cfg = dataclasses.replace(TINY, max_seconds=1e-9, max_steps=50)
    with pytest.raises(TimeoutError, match="safety stop"):
        fit(VQGAN(cfg.vqgan()), images, cfg, patch_centres(images, cfg))
