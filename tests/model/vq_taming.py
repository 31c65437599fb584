"""Builders for taming-transformers-layout checkpoints made with taming's own modules (random weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn


class TamingVQ(nn.Module):
    """taming.models.vqgan.VQModel's parts and key names without its Lightning wrapper (which does
    not import here): encoder, decoder, quantize, quant_conv, post_quant_conv."""

    def __init__(self, ddconfig: dict[str, Any], n_embed: int, embed_dim: int):
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, legacy=True)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """taming's own encode path -> (B, H, W) indices."""
        h = self.quant_conv(self.encoder(x))
        _, _, (_, _, idx) = self.quantize(h)
        return idx.view(h.shape[0], h.shape[2], h.shape[3])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        b, h, w = codes.shape
        zq = self.quantize.get_codebook_entry(codes.flatten(), (b, h, w, self.quantize.e_dim))
        return self.decoder(self.post_quant_conv(zq))


def ddconfig(resolution: int, ch_mult: list[int], attn: list[int], ch: int = 32,
             z_channels: int = 32) -> dict[str, Any]:
    return {"double_z": False, "z_channels": z_channels, "resolution": resolution, "in_channels": 3,
            "out_ch": 3, "ch": ch, "ch_mult": ch_mult, "num_res_blocks": 1,
            "attn_resolutions": attn, "dropout": 0.0}


def random_taming(dd: dict[str, Any], n_embed: int, embed_dim: int, seed: int = 0) -> TamingVQ:
    torch.manual_seed(seed)
    m = TamingVQ(dd, n_embed, embed_dim).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # GroupNorm affine off its identity init, so wrong grouping would show
                p.add_(torch.randn_like(p) * 0.1)
        m.quantize.embedding.weight.normal_()  # spread codes so that argmin is not degenerate
    return m


def save_taming(m: TamingVQ, dd: dict[str, Any], n_embed: int, embed_dim: int, path: Path,
                target: str | None = "taming.models.vqgan.VQModel", yaml_n_embed: int | None = None) -> Path:
    """`<path>` in taming's ckpt layout (with a GAN-loss tensor it ships) and `<stem>.yaml` beside it."""
    state = dict(m.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "global_step": 1}, path)
    params = {"embed_dim": embed_dim, "n_embed": yaml_n_embed or n_embed, "ddconfig": dd,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}
    doc: dict[str, Any] = {"model": {"params": params}}
    if target:
        doc["model"]["target"] = target
    path.with_suffix(".yaml").write_text(yaml.safe_dump(doc))
    return path
