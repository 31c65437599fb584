"""Image IO shared by the tokenizer, the demo VQGAN fit and evaluation: JPEG bytes <-> arrays."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def load_image(jpg: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> (size, size, 3) uint8, resized with antialiasing."""
    img = Image.open(io.BytesIO(jpg)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(img, dtype=np.uint8)  # writable: torch.from_numpy needs it



def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
