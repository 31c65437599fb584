"""Fréchet distance between image feature sets: Inception-v3 pool features when its weights are a
local file (standard FID), else a labelled substitute (a CLIP image tower), never called plain FID."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


@dataclass
class FeatureExtractor:
    """Images -> (N, D) features, with the metric name the distance is reported under."""

    metric: str  # "FID" only for Inception-v3; "FID-CLIP(<model>)" for the substitute
    extract: Callable[[list[Image.Image]], np.ndarray]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of feature sets a (N, D), b (M, D).

    Tr((S_a S_b)^1/2) = sum of sqrt eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric, PSD), which
    stays real and stable when the covariances are singular (fewer samples than dimensions).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Fréchet distance needs >= 2 images per set, got {len(a)} and {len(b)}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ sb @ root_a)
    covmean = float(np.sqrt(np.clip(middle, 0, None)).sum())
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * covmean)


def clip_extractor(encoder, label: str) -> FeatureExtractor:
    """The index encoder's image tower as the feature space (normalised embeddings)."""
    return FeatureExtractor(f"FID-CLIP({label})", lambda ims: encoder.encode_image(ims))


def inception_extractor(weights: str, device: str = "cpu", batch: int = 32) -> FeatureExtractor:
    """torchvision Inception-v3 with weights from a local state-dict file; 2048-d pool features
    at 299x299 (the FID feature layer)."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"Inception-v3 weights {weights} not found: supply a torchvision inception_v3 state "
            f"dict there (evaluate.inception_weights), or leave the field empty to use the "
            f"labelled CLIP substitute")
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.fc = torch.nn.Identity()
    net = net.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def extract(images: list[Image.Image]) -> np.ndarray:
        outs = []
        for s in range(0, len(images), batch):
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize(
                (299, 299), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0).permute(2, 0, 1)
                for im in images[s:s + batch]])  # (B, 3, 299, 299)
            outs.append(net(((x - mean) / std).to(device)).float().cpu())  # (B, 2048)
        return torch.cat(outs).numpy()

    return FeatureExtractor("FID", extract)
