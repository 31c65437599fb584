"""The CM3 generator: a decoder-only Transformer with per-document rotary positions and a KV cache."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# One (k, v) pair per layer, each (B, H, S, Dh); S grows as tokens are fed.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TransformerConfig:
    """Size of the decoder; `vocab_size` comes from the Vocab at build time."""

    vocab_size: int = 512  # ids in the shared text+image+special vocabulary
    n_layer: int = 4  # decoder blocks
    n_head: int = 4  # attention heads
    d_model: int = 128  # residual width
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    max_seq_len: int = 512  # longest packed sequence (positions restart per document)
    dropout: float = 0.0  # on attention output and MLP output
    rope_base: float = 10000.0  # rotary frequency base
    tie_embeddings: bool = True  # share the input embedding and the output projection

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_head} heads of even size")

    def to_dict(self) -> dict:
        return asdict(self)


# Presets are data: `demo` trains on 2 CPU cores in minutes (~1M parameters, docs/demo-design.md);
# `paper` is the 2.7B decoder of RA-CM3 §4.1 (OPT-2.7B shape) with sequence length 4096.
PRESETS: dict[str, TransformerConfig] = {
    "demo": TransformerConfig(n_layer=4, n_head=4, d_model=128, max_seq_len=1024),
    "paper": TransformerConfig(n_layer=32, n_head=32, d_model=2560, max_seq_len=4096),
}


def preset(name: str, vocab_size: int, **overrides) -> TransformerConfig:
    """A preset config sized for `vocab_size`, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], vocab_size=vocab_size, **overrides)


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B, T, 1, 1, Dh / 2), float32


def rope(positions: torch.Tensor, head_dim: int, base: float) -> Rope:
    """The rotary angles' (cos, sin) for positions (B, T): computed once per forward and shared
    by every layer."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, :, None, None, None] * inv_freq  # (B, T, 1, 1, half)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, angles: Rope) -> torch.Tensor:
    """Rotate pairs of channels (i, i + Dh/2) of x (B, T, n, H, Dh) by the angles: RoPE in its
    half-split form (the layout every checkpoint was trained with)."""
    half = x.shape[-1] // 2
    cos, sin = angles[0].to(x.dtype), angles[1].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: token i sees token j iff j <= i and both are in one segment
    (one packed example); the diagonal is always allowed, so no row is empty."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def project(self, x: torch.Tensor, angles: Rope) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, H, T, Dh) of x (B, T, C), q and k rotated: one rotation of both while
        they are still contiguous in the qkv output."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k = rotate(qkv[:, :, :2], angles).permute(2, 0, 3, 1, 4)
        return q, k, qkv[:, :, 2].transpose(1, 2)

    def forward(self, x: torch.Tensor, angles: Rope,
                past: tuple[torch.Tensor, torch.Tensor] | None,
                block_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        B, T, C = x.shape
        q, k, v = self.project(x, angles)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        drop = self.dropout if self.training else 0.0
        y = attend(q, k, v, block_mask if past is None else None, drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor | None,
           drop: float) -> torch.Tensor:
    """SDPA of (B, H, T, Dh) queries over (B, H, S, Dh) keys: `block_mask` if given, else causal
    (new tokens see the whole cache plus the new tokens before them)."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU bf16 autocast keeps attention float32: there the flash kernel's fwd + bwd took
        # 0.65x the time of its bf16 one (benchmarks/bench_train.py); the matmuls stay bf16
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), block_mask, drop).to(q.dtype)
    T, S = q.shape[2], k.shape[2]
    if block_mask is not None:  # packed examples do not see each other
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, dropout_p=drop)
    if S == T:  # no cache: plain causal attention over the packed sequence
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, angles: Rope, past=None,
                block_mask: torch.Tensor | None = None):
        a, kv = self.attn(self.ln1(x), angles, past, block_mask)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x))), kv


class Transformer(nn.Module):
    """Decoder-only LM: forward(ids, positions, cache) -> (logits, cache)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.activation_checkpointing = False  # a training option (train.activation_checkpointing)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """ids, positions (B, T) -> logits (B, T, V) and the cache extended by these T tokens.
        `segments` (B, T), training only: tokens attend only within their own segment."""
        x, new_cache = self.hidden(ids, positions, cache, segments)
        return self.head(x), new_cache

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
               segments: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """The final normed hidden states (B, T, C), before the output projection (so a
        chunked loss can project a few tokens at a time)."""
        x = self.embed(ids)  # (B, T, C)
        mask = block_causal_mask(segments) if segments is not None and cache is None else None
        angles = self.rope(positions)
        new_cache: KVCache = []
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            past = None if cache is None else cache[i]
            if ckpt:  # recompute the block in backward: activations of one block at a time
                x, kv = checkpoint(block, x, angles, past, mask, use_reentrant=False)
            else:
                x, kv = block(x, angles, past, mask)
            new_cache.append(kv)
        return self.ln_f(x), new_cache

    def rope(self, positions: torch.Tensor) -> Rope:
        """The rotary angles of positions (B, T), for every layer."""
        return rope(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_base)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
