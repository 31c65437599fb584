"""The mixed-modal CLIP document encoder: normalisation, averaging, checkpoints, query dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.clip_encoder import (
    DocEncoder,
    check_model_name,
    create_clip,
    decode_image,
    keep_indices,
    l2_normalize,
    mix,
)
from tests.factories import entity_image, jpeg_bytes


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> DocEncoder:
    torch.manual_seed(0)
    model, *_ = create_clip("racm3-tiny")
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(model.state_dict(), path)
    return DocEncoder.load("racm3-tiny", str(path), "racm3-tiny@test", batch_size=4)


def test_mix_is_normalised_mean_of_normalised_parts():
    rng = np.random.default_rng(0)
    t, i = rng.normal(size=(5, 8)) * 3, rng.normal(size=(5, 8)) * 0.1
    both, none = np.ones(5, bool), np.zeros(5, bool)
    expected = l2_normalize(l2_normalize(t) + l2_normalize(i))
    np.testing.assert_allclose(mix(t, i, both, both), expected, rtol=1e-5)
    np.testing.assert_allclose(mix(t, i, both, none), l2_normalize(t), rtol=1e-5)  # text-only doc
    np.testing.assert_allclose(mix(t, i, none, both), l2_normalize(i), rtol=1e-5)  # image-only doc
    assert not mix(t, i, none, none).any()


def test_encode_docs_parts_and_doc_are_unit_vectors(encoder):
    images = [entity_image(e, 64, seed=e) for e in range(3)]
    out = encoder.encode_docs(["a photo of the zorvik", "", "the quaro"], [images[0], images[1], None])
    assert out["has_text"].tolist() == [True, False, True]
    assert out["has_image"].tolist() == [True, True, False]
    assert out["doc_emb"].shape == (3, encoder.info.dim) == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(out["doc_emb"], axis=1), 1.0, rtol=1e-5)
    t, i = out["text_emb"][0], out["image_emb"][0]
    np.testing.assert_allclose(out["doc_emb"][0], l2_normalize(t + i), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["doc_emb"][1], out["image_emb"][1], rtol=1e-5)  # image only
    np.testing.assert_allclose(out["doc_emb"][2], out["text_emb"][2], rtol=1e-5)  # text only
    assert not out["text_emb"][1].any() and not out["image_emb"][2].any()


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "ViT-L-14.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DocEncoder.load("racm3-tiny", str(missing))


def test_unknown_model_config_is_refused():
    with pytest.raises(ValueError, match="unknown open_clip model config"):
        check_model_name("no-such-clip")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not fit model config"):
        DocEncoder.load("racm3-tiny", str(path))


def test_text_dropout_removes_a_fifth_of_caption_tokens_reproducibly(encoder):
    cap = ["one two three four five six seven eight nine ten"]
    full = encoder.tokenize(cap)[0]
    dropped = encoder.tokenize(cap, 0.2, [7])[0]
    n_full, n_drop = int((full > 0).sum()), int((dropped > 0).sum())
    assert n_full - n_drop == 2  # 20% of the 10 content tokens; sot and eot stay
    assert dropped[0] == full[0] and dropped.max() == full.max()  # sot first, eot kept
    assert torch.equal(dropped, encoder.tokenize(cap, 0.2, [7])[0])
    assert not torch.equal(dropped, encoder.tokenize(cap, 0.2, [8])[0])
    a = encoder.encode_text(cap * 2, 0.2, [7, 8])
    np.testing.assert_allclose(a, encoder.encode_text(cap * 2, 0.2, [7, 8]), rtol=1e-6)
    assert not np.allclose(a[0], a[1])


def test_image_patch_dropout_is_seeded(encoder):
    imgs = [entity_image(1, 64), entity_image(2, 64)]
    full = encoder.encode_image(imgs)
    a = encoder.encode_image(imgs, 0.2, [1, 2])
    np.testing.assert_allclose(a, encoder.encode_image(imgs, 0.2, [1, 2]), rtol=1e-6)
    assert not np.allclose(a, encoder.encode_image(imgs, 0.2, [3, 4]))
    assert not np.allclose(a, full)
    np.testing.assert_allclose(full, encoder.encode_image(imgs), rtol=1e-6)  # dropout switched off
    assert len(keep_indices(encoder.n_patches, 0.2, 0)) == encoder.n_patches - 3  # 16 patches


def test_decode_image_returns_none_for_bad_bytes():
    assert decode_image(b"<html>not an image</html>") is None
    assert decode_image(None) is None
    assert decode_image(jpeg_bytes(entity_image(0, 32))).size == (32, 32)


def test_demo_config_avg_pools_over_the_kept_patches_only(tmp_path):
    torch.manual_seed(0)
    model, *_ = create_clip("racm3-demo")
    path = tmp_path / "demo.pt"
    torch.save(model.state_dict(), path)
    enc = DocEncoder.load("racm3-demo", str(path), "racm3-demo@test", batch_size=4)
    assert enc.model.visual.pool_type == "avg"
    imgs = [entity_image(1, 64), entity_image(2, 64)]
    full = enc.encode_image(imgs)
    a = enc.encode_image(imgs, 0.2, [1, 2])  # the mean over the kept patches moves with the seed
    np.testing.assert_allclose(a, enc.encode_image(imgs, 0.2, [1, 2]), rtol=1e-6)
    assert not np.allclose(a, enc.encode_image(imgs, 0.2, [3, 4])) and not np.allclose(a, full)


def framed(side: int = 256, border: int = 32) -> Image.Image:
    """A red square on a blue frame `border` pixels wide."""
    arr = np.zeros((side, side, 3), np.uint8)
    arr[:] = (0, 0, 255)
    arr[border:side - border, border:side - border] = (255, 0, 0)
    return Image.fromarray(arr)


def test_demo_clip_sees_the_centre_crop_and_its_fingerprint_says_so():
    from model.clip_encoder import CENTRE_CROP, CentreCrop, encoder_fingerprint

    crop = CentreCrop(0.75, lambda im: im)(framed())
    assert crop.size == (192, 192)
    arr = np.asarray(crop)
    assert (arr[..., 2] < 10).all() and (arr[..., 0] > 245).all()  # the frame is gone, all of it
    _, _, eval_tf, _ = create_clip("racm3-demo")
    x = eval_tf(framed())  # normalised (3, 64, 64): blue channel low everywhere
    _, _, plain_tf, _ = create_clip("racm3-tiny")  # no crop: the frame stays in
    assert float(x[2].max()) < float(plain_tf(framed())[2].max()) - 1.0
    assert CENTRE_CROP["racm3-demo"] == 0.75 and "racm3-tiny" not in CENTRE_CROP
    assert encoder_fingerprint("racm3-demo", "sha256:" + "a" * 64).endswith("+crop0.75")
    assert encoder_fingerprint("racm3-tiny", "sha256:" + "a" * 64) == "racm3-tiny@" + "a" * 16
