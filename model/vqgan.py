"""The VQGAN network in plain PyTorch, in taming-transformers' parameter names (families: model.vq).

Layout follows taming/modules/diffusionmodules/model.py (Encoder, Decoder) and
taming/modules/vqvae/quantize.py (VectorQuantizer): `encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`, `quantize.embedding.weight`. Images are float tensors in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CONFIG_KEY = "racm3_vqgan_config"  # our checkpoints embed the architecture beside `state_dict`


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of a taming-style VQGAN; the factor is 2 ** (len(ch_mult) - 1)."""

    resolution: int = 256  # image side the model was trained at
    in_channels: int = 3  # RGB
    ch: int = 128  # base channel width
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)  # width multiplier per level; one downsample between levels
    num_res_blocks: int = 2  # residual blocks per level (decoder uses one more)
    attn_resolutions: tuple[int, ...] = (32,)  # feature-map sides that get self-attention
    z_channels: int = 256  # encoder output channels
    embed_dim: int = 256  # codebook vector size
    n_embed: int = 8192  # codebook size
    norm_groups: int = 32  # GroupNorm groups (taming hard-codes 32; tiny models need fewer)
    dropout: float = 0.0
    beta: float = 0.25  # commitment loss weight
    l2_norm: bool = False  # codes are nearest by cosine: latents and codebook l2-normalised (LlamaGen)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.factor

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.l2_norm:  # left out at its default: fingerprints of earlier models stay the same
            del d["l2_norm"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs)


PRESETS: dict[str, VQGANConfig] = {
    # f8, 8192 codes: 256x256 -> 32x32 = 1024 tokens, as CM3 / RA-CM3 use (paper §4.1).
    "paper": VQGANConfig(),
    # Tiny f4: 32x32 -> 8x8 = 64 tokens with a coarse 64-code book (docs/demo-design.md).
    "demo": VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=(), z_channels=32, embed_dim=16, n_embed=64,
                        norm_groups=8),
}


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(groups, c), num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int, cfg: VQGANConfig):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, cfg.norm_groups, cfg.dropout)
        self.attn_1 = AttnBlock(c, cfg.norm_groups)
        self.block_2 = ResnetBlock(c, c, cfg.norm_groups, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block.i`, `attn.i` and an optional `downsample`/`upsample`."""

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, cfg: VQGANConfig):
        super().__init__()
        g = cfg.norm_groups
        self.block = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, g, cfg.dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, g) for _ in range(n_blocks if attn else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        res, cin = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            level = Level(cin, cout, cfg.num_res_blocks, res in cfg.attn_resolutions, cfg)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cout)
                res //= 2
            self.down.append(level)
            cin = cout
        self.mid = Mid(cin, cfg)
        self.norm_out = norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, R, R)
        for level in self.down:
            h = level(h)
            down = getattr(level, "downsample", None)  # absent on the last level (taming's layout)
            if down is not None:
                h = down(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))  # (B, z, R/f, R/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        cin = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, 1, 1)
        self.mid = Mid(cin, cfg)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            level = Level(cin, cout, cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg)
            if i != 0:
                level.upsample = Upsample(cout)
                res *= 2
            levels.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(levels)  # up.0 is the finest level, as in taming
        self.norm_out = norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            up = getattr(level, "upsample", None)  # absent on the finest level
            if up is not None:
                h = up(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, 3, R, R)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantizer with a straight-through gradient (taming's legacy VQ)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float, l2_norm: bool = False):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.l2_norm = n_embed, embed_dim, beta, l2_norm
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def book(self) -> torch.Tensor:
        e = self.embedding.weight  # (N, D)
        return F.normalize(e, dim=-1) if self.l2_norm else e

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) int64 indices of the nearest codebook vectors."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (BHW, D)
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        e = self.book()
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return dist.argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, H, W) indices -> (B, D, H, W) codebook vectors."""
        return F.embedding(codes, self.book()).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = self.codes(z)
        if self.l2_norm:
            z = F.normalize(z, dim=1)
        zq = self.lookup(codes)
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), loss, codes  # straight-through estimator


class VQGAN(nn.Module):
    """encode(images) -> codes (B, H, W); decode(codes) -> images (B, 3, R, R), both batched."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.l2_norm)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))  # (B, D, R/f, R/f)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) floats in [-1, 1] -> (B, R/f, R/f) int64 codes."""
        return self.quantize.codes(self.latents(images))

    def decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, H, W) codes -> (B, 3, H*f, W*f) images, clamped to [-1, 1]."""
        return self.decode_latents(self.quantize.lookup(codes)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, codebook + commitment loss, codes)."""
        zq, qloss, codes = self.quantize(self.latents(images))
        return self.decode_latents(zq), qloss, codes


def save_checkpoint(model: VQGAN, path: str) -> None:
    """Write `{"state_dict": ..., racm3_vqgan_config: ...}` (taming's key layout, loads weights-only)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, CONFIG_KEY: model.cfg.to_dict()}, path)


def state_fingerprint(model: VQGAN) -> str:
    """Digest of the weights and architecture: tokens from different codebooks never mix."""
    h = hashlib.sha256(repr(sorted(model.cfg.to_dict().items())).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
