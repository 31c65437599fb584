"""Conversions between PIL images, pixel arrays and VQGAN codes at inference."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model.vqgan import VQGAN


def at_size(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8, resized as `model.images.load_image` resizes the training images."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, R, R) in [-1, 1] -> PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def decode_codes(vqgan: VQGAN, codes: np.ndarray | list[list[int]], grid: int) -> list[Image.Image]:
    """(B, grid*grid) raw codes -> PIL images through the VQGAN decoder."""
    return to_pil(vqgan.decode(torch.as_tensor(np.asarray(codes), dtype=torch.long).view(-1, grid, grid)))
