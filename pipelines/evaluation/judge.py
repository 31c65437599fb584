"""The CLIP that gives the CLIP score: the retrieval CLIP by default, or another one
(`evaluate.judge_model` / `judge_checkpoint`) so that the score is not judged by the retriever."""

from __future__ import annotations

import numpy as np
from PIL import Image

from model.clip_encoder import DocEncoder, encoder_fingerprint
from storage.fs import DataRoot, file_digest


def judge_clip(root: DataRoot, retrieval: DocEncoder, model: str, checkpoint: str,
               device: str = "cpu") -> DocEncoder:
    """`retrieval` when neither field is set; else `model` (default: the retrieval CLIP's config)
    with the weights at `checkpoint`, fingerprinted like every racm3 encoder."""
    if not checkpoint:
        return retrieval
    name = model or retrieval.info.model
    path = root.resolve(checkpoint)
    if not root.exists(path):
        raise FileNotFoundError(f"judge CLIP weights {path} not found (evaluate.judge_checkpoint): "
                                "supply an open_clip state-dict file there, or leave the field "
                                "empty to judge with the retrieval CLIP")
    fp = encoder_fingerprint(name, file_digest(root.fs, path))
    return DocEncoder.load(name, root.local_copy(path), fp, device)


def clip_scores(judge: DocEncoder, images: list[Image.Image], caption: str) -> np.ndarray:
    """(N,) cosine similarities of each image with the caption under `judge`."""
    return judge.encode_image(images) @ judge.encode_text([caption])[0]
