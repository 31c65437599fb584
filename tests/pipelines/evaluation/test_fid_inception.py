"""The standard FID: racm3's features are pytorch-fid's own on the same images (random weights saved
in the library's layout); torchvision's ImageNet Inception weights are refused, naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_fid import inception as lib
from torchvision.transforms.functional import to_tensor

from pipelines.evaluation.fid import inception_extractor


def random_fid_weights(path) -> None:
    """A random state dict in pytorch-fid's `pt_inception-2015-12-05` layout: torchvision's
    Inception-v3 with 1,008 classes and no aux head has exactly its keys and shapes (the FID
    blocks subclass torchvision's and change only `forward`)."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=True)
    for m in net.modules():  # keep activations in range through 90-odd random layers
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(256, 256), (320, 200), (64, 80)]  # different sizes: resized one by one
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for w, h in sizes] + [
        Image.fromarray(rng.integers(0, 256, (90, 90), np.uint8), mode="L")]  # grey -> RGB


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-random.pth"
    random_fid_weights(path)
    return str(path)


def library_features(weights: str, ims: list[Image.Image], monkeypatch) -> np.ndarray:
    """pytorch-fid's own path: `InceptionV3()` (its download answered from the file), images
    through `ToTensor` as its `ImagePathDataset` reads them, one at a time."""
    monkeypatch.setattr(lib, "load_state_dict_from_url",
                        lambda *_a, **_k: torch.load(weights, weights_only=True))
    net = lib.InceptionV3([3]).eval()
    with torch.no_grad():
        return np.concatenate([net(to_tensor(im.convert("RGB"))[None])[0].flatten(1).numpy()
                               for im in ims])


def test_features_equal_pytorch_fid_own(weights, monkeypatch):
    ims = images()
    fx = inception_extractor(weights, batch=3)
    ours = fx.extract(ims)
    theirs = library_features(weights, ims, monkeypatch)
    assert fx.metric == "FID"
    assert ours.shape == (4, 2048) and np.isfinite(ours).all()
    assert ours.std() > 1e-3  # not a degenerate network: the comparison means something
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # different images, different features


def test_the_download_is_never_attempted(weights, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("pytorch-fid tried to download its weights")

    monkeypatch.setattr(lib, "load_state_dict_from_url", refuse)
    assert inception_extractor(weights).extract(images()[:1]).shape == (1, 2048)
    assert lib.load_state_dict_from_url is refuse  # restored after the build


def test_torchvision_imagenet_weights_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "inception_v3_google.pth"
    torch.save(torchvision.models.inception_v3(weights=None, init_weights=False).state_dict(), path)
    with pytest.raises(ValueError, match="inception_v3_google.pth is not pytorch-fid's"):
        inception_extractor(str(path))


def test_missing_weights_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        inception_extractor(str(tmp_path / "nope.pth"))
