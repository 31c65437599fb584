"""The judge CLIP of the CLIP score: the retrieval CLIP unless `evaluate.judge_*` name another one,
whose scores are open_clip's own; a judge without weights or of an unknown config is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.clip_encoder import DocEncoder, create_clip
from pipelines.core.config import ConfigError
from pipelines.core.registry import load_config
from pipelines.evaluation.judge import clip_scores, judge_clip
from storage.fs import DataRoot


def tiny_clip(path, seed: int) -> None:
    torch.manual_seed(seed)
    model, *_ = create_clip("racm3-tiny")
    torch.save(model.state_dict(), path)


def test_no_judge_fields_means_the_retrieval_clip(tmp_path):
    tiny_clip(tmp_path / "retrieval.pt", 0)
    retrieval = DocEncoder.load("racm3-tiny", str(tmp_path / "retrieval.pt"))
    assert judge_clip(DataRoot(str(tmp_path)), retrieval, "", "") is retrieval


def test_a_separate_judge_scores_as_open_clip_does(tmp_path):
    tiny_clip(tmp_path / "retrieval.pt", 0)
    tiny_clip(tmp_path / "judge.pt", 1)
    root = DataRoot(str(tmp_path))
    retrieval = DocEncoder.load("racm3-tiny", str(tmp_path / "retrieval.pt"))
    judge = judge_clip(root, retrieval, "racm3-tiny", "judge.pt")
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)) for _ in range(3)]
    ours = clip_scores(judge, ims, "a red bird")
    model, _, tf, tok = create_clip("racm3-tiny", str(tmp_path / "judge.pt"))
    with torch.no_grad():  # open_clip directly, with the same weights and preprocessing
        img = model.encode_image(torch.stack([tf(im) for im in ims]), normalize=True)
        txt = model.encode_text(tok(["a red bird"]), normalize=True)
    np.testing.assert_allclose(ours, (img @ txt[0]).numpy(), atol=1e-5)
    assert judge.info.fingerprint.startswith("racm3-tiny@")
    assert not np.allclose(ours, clip_scores(retrieval, ims, "a red bird"), atol=1e-3)


@pytest.mark.parametrize("overrides, field", [
    (["evaluate.judge_model=racm3-tiny"], "evaluate.judge_checkpoint"),
    (["evaluate.judge_model=no-such-clip", "evaluate.judge_checkpoint=j.pt"], "evaluate.judge_model"),
])
def test_bad_judge_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config("demo", overrides=overrides)
    assert e.value.field == field


def test_missing_judge_weights_name_the_field(tmp_path):
    tiny_clip(tmp_path / "retrieval.pt", 0)
    retrieval = DocEncoder.load("racm3-tiny", str(tmp_path / "retrieval.pt"))
    with pytest.raises(FileNotFoundError, match="evaluate.judge_checkpoint"):
        judge_clip(DataRoot(str(tmp_path)), retrieval, "", "missing.pt")
