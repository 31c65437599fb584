"""LlamaGen VQ family (FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`).

A state dict under `"model"`; its encoder/decoder are taming's with other names (`conv_blocks.i.res.j`,
`mid.0..2`, decoder levels coarsest first), attention on the coarsest level only, and an
l2-normalised codebook. The architecture is read from the tensor shapes (LlamaGen ships no yaml).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from model.vq.checks import CheckpointError
from model.vqgan import VQGANConfig

NAME = "llamagen"
MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def matches(ckpt: dict[str, Any]) -> bool:
    state = ckpt.get("model")
    return isinstance(state, dict) and "encoder.conv_blocks.0.res.0.conv1.weight" in state


def levels(state: dict[str, torch.Tensor], part: str) -> int:
    return 1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"{part}.conv_blocks."))


def rename(key: str, n_levels: int) -> str:
    """A LlamaGen key in racm3's (taming's) layout."""
    m = re.match(r"(encoder|decoder)\.conv_blocks\.(\d+)\.(.*)", key)
    if m:
        part, i, rest = m.group(1), int(m.group(2)), m.group(3)
        level = i if part == "encoder" else n_levels - 1 - i  # LlamaGen's decoder lists coarsest first
        rest = re.sub(r"^res\.", "block.", rest)
        return f"{part}.{'down' if part == 'encoder' else 'up'}.{level}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid\.(\d)\.(.*)", key)
    return f"{m.group(1)}.mid.{MID[m.group(2)]}.{m.group(3)}" if m else key


def config_from_state(state: dict[str, torch.Tensor], resolution: int) -> VQGANConfig:
    """The architecture from tensor shapes; attention sits on the coarsest level at any resolution."""
    n = levels(state, "encoder")
    ch = state["encoder.conv_in.weight"].shape[0]
    mult = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv2.weight"].shape[0] // ch for i in range(n))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.conv_blocks.0.res."))
    n_embed, embed_dim = state["quantize.embedding.weight"].shape
    return VQGANConfig(resolution=resolution, in_channels=state["encoder.conv_in.weight"].shape[1],
                       ch=ch, ch_mult=mult, num_res_blocks=blocks,
                       attn_resolutions=(resolution // 2 ** (n - 1),),
                       z_channels=state["encoder.conv_out.weight"].shape[0], embed_dim=embed_dim,
                       n_embed=n_embed, norm_groups=32, l2_norm=True)


def read(ckpt: dict[str, Any], path: str, config_path: str | None, fallback: VQGANConfig | None,
         resolution: int = 256) -> tuple[VQGANConfig, dict[str, torch.Tensor], str]:
    """(architecture, state dict in racm3's layout, "tensors"); `fallback` is unused (shapes say all),
    `resolution` (tokenize.image_size) only places the coarsest level's attention."""
    if config_path:
        raise CheckpointError(f"{path} is a LlamaGen VQ checkpoint, which reads its architecture from "
                              "its tensors: leave tokenize.vqgan_config empty", "vqgan_config")
    state = {k: v for k, v in ckpt["model"].items() if k != "quantize.codebook_used"}  # training stat
    try:
        cfg = config_from_state(state, resolution)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is not a complete LlamaGen VQ state dict (no {e})") from e
    n = len(cfg.ch_mult)
    return cfg, {rename(k, n): v for k, v in state.items()}, "tensors"
