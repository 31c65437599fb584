"""Sampling from the decoder with its KV cache: temperature, top-k and top-p (nucleus) filtering,
forced ids (infilling keeps known tokens), and classifier-free guidance with every branch of the
guidance in one left-padded batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import cast

import torch
import torch.nn.functional as F

from model.transformer import Attention, Block, KVCache, Rope, Transformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf all logits (B, V) outside the top k and outside the smallest set of mass top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def keep_mask(allowed: Collection[int] | None, vocab_size: int,
              device: torch.device) -> torch.Tensor | None:
    """(V,) bool of the ids sampling may pick, or None for all."""
    if allowed is None:
        return None
    keep = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    keep[list(allowed)] = True
    return keep


def force(nxt: torch.Tensor, forced: Sequence[int] | None, t: int) -> torch.Tensor:
    """Replace the sampled ids (B, 1) by forced[t] where forced[t] >= 0 (a known token)."""
    if forced is None or t >= len(forced) or forced[t] < 0:
        return nxt
    return torch.full_like(nxt, int(forced[t]))


@torch.no_grad()
def sample(model: Transformer, prompt: torch.Tensor, positions: torch.Tensor, max_new: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           allowed: Collection[int] | None = None, stop: int | None = None,
           generator: torch.Generator | None = None,
           forced: Sequence[int] | None = None, min_new: int = 0) -> torch.Tensor:
    """Continue prompt (B, T) whose positions are (B, T); returns the new ids (B, <= max_new).

    `allowed` restricts sampling to a set of ids (e.g. image codes while generating an image);
    generation stops once every row has produced `stop`. temperature 0 means greedy.
    `forced[t] >= 0` feeds that id at step t instead of a sample (infilling's known tokens).
    `min_new`: `stop` cannot be sampled before that many new tokens (no empty captions).
    """
    model.eval()
    logits, cache = model(prompt, positions)
    pos = positions[:, -1:] + 1  # (B, 1) the next position within the current document
    keep = keep_mask(allowed, logits.shape[-1], logits.device)
    out, done = [], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for t in range(max_new):
        step = logits[:, -1].float()  # (B, V)
        if keep is not None:
            step = step.masked_fill(~keep, float("-inf"))
        if stop is not None and t < min_new:
            step[:, stop] = float("-inf")
        nxt = force(pick(step, temperature, top_k, top_p, generator), forced, t)  # (B, 1)
        out.append(nxt)
        if stop is not None:
            done |= nxt[:, 0] == stop
            if bool(done.all()):
                break
        logits, cache = model(nxt, pos, cache)
        pos = pos + 1
    return torch.cat(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of logits (B, V): argmax at temperature 0, else a filtered sample."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


# ---------------------------------------------------------------------------- padded batches


def left_pad(prompts: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, valid) (B, T) of prompts of different lengths, right-aligned so that every
    row's next token lands in the same column; `valid` is False on the padding."""
    width = max(len(ids) for ids, _ in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for r, (i, p) in enumerate(prompts):
        n = len(i)
        ids[r, width - n:], pos[r, width - n:] = torch.tensor(list(i)), torch.tensor(list(p))
        valid[r, width - n:] = True
    return ids.to(device), pos.to(device), valid.to(device)


def masked_forward(model: Transformer, ids: torch.Tensor, positions: torch.Tensor,
                   valid: torch.Tensor, cache: KVCache | None = None
                   ) -> tuple[torch.Tensor, KVCache]:
    """`model(ids, positions, cache)` where keys with valid (B, S) False are never attended to
    (S = cached + new tokens): the decoder's own blocks, with a padding-aware attention mask.
    Each token may always see itself, so an all-padding row stays finite (its output is unused)."""
    mask = attention_mask(valid, ids.shape[1])  # (B, 1, T, S), built once for every layer
    x = model.embed(ids)  # (B, T, C)
    angles = model.rope(positions)
    new_cache: KVCache = []
    for i, block in enumerate(cast(list[Block], list(model.blocks))):
        a, kv = masked_attention(block.attn, block.ln1(x), angles, mask,
                                 None if cache is None else cache[i])
        x = x + a
        x = x + block.mlp(block.ln2(x))
        new_cache.append(kv)
    return model.head(model.ln_f(x)), new_cache


def attention_mask(valid: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, S) bool: causal over the last T of S keys, padding keys hidden, self visible."""
    B, S = valid.shape
    if T == 1:  # one new token per row: it sees every valid key and itself (the last one)
        return valid[:, None, None, :]
    causal = torch.ones(T, S, dtype=torch.bool, device=valid.device).tril(diagonal=S - T)
    itself = torch.zeros(T, S, dtype=torch.bool, device=valid.device)
    itself[torch.arange(T), torch.arange(S - T, S)] = True
    return ((causal[None] & valid[:, None, :]) | itself[None])[:, None]


def masked_attention(attn: Attention, x: torch.Tensor, angles: Rope,
                     mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`model.transformer.Attention.forward` with an explicit mask (attention dropout off: eval)."""
    B, T, C = x.shape
    q, k, v = attn.project(x, angles)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


# ---------------------------------------------------------------------------- guidance


def guide(logp: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Classifier-free guidance over branches (G, B, V) of log-probs: branch 0 has every
    condition, branch g drops one; l0 + sum_g w_g (l0 - l_g). All weights 0 -> exactly l0."""
    out = logp[0].clone()
    for g, w in enumerate(weights, start=1):
        if w:
            out = out + w * (logp[0] - logp[g])
    return out


def mixture(logp: torch.Tensor) -> torch.Tensor:
    """Ensemble of branches (G, B, V) of log-probs: the log of their mean probability."""
    return torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])


@torch.no_grad()
def sample_guided(model: Transformer, branches: Sequence[tuple[Sequence[int], Sequence[int]]],
                  weights: Sequence[float], n: int, max_new: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, allowed: Collection[int] | None = None,
                  generator: torch.Generator | None = None,
                  forced: Sequence[int] | None = None) -> torch.Tensor:
    """n samples (n, max_new) with guidance: branches are (ids, positions) prompts, branch 0
    the fully conditioned one, weights[g-1] the guidance weight of branch g (see `guide`)."""
    if len(weights) != len(branches) - 1:
        raise ValueError(f"{len(branches)} branches need {len(branches) - 1} weights, got {len(weights)}")
    return sample_branches(model, branches, lambda logp: guide(logp, weights), n, max_new,
                           temperature, top_k, top_p, allowed, generator, forced)


@torch.no_grad()
def sample_branches(model: Transformer, branches: Sequence[tuple[Sequence[int], Sequence[int]]],
                    combine: Callable[[torch.Tensor], torch.Tensor], n: int, max_new: int,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    allowed: Collection[int] | None = None,
                    generator: torch.Generator | None = None,
                    forced: Sequence[int] | None = None) -> torch.Tensor:
    """n samples (n, max_new) from `combine` (G, n, V) log-probs -> (n, V) of G prompts. All
    G branches x n rows run as ONE left-padded batch (G*n rows) through the KV cache; every
    branch is fed the same sampled token at each step (guidance, ensembles over passes)."""
    model.eval()
    device = next(model.parameters()).device
    G = len(branches)
    ids, pos, valid = left_pad([b for b in branches for _ in range(n)], device)  # (G*n, T)
    logits, cache = masked_forward(model, ids, pos, valid)
    pos = pos[:, -1:] + 1  # (G*n, 1)
    keep = keep_mask(allowed, logits.shape[-1], logits.device)
    out = []
    for t in range(max_new):
        step = logits[:, -1].float()  # (G*n, V)
        if keep is not None:
            step = step.masked_fill(~keep, float("-inf"))
        mixed = combine(step.log_softmax(-1).view(G, n, -1))  # (n, V)
        if keep is not None:  # disallowed ids are -inf - -inf = nan after guidance
            mixed = mixed.masked_fill(~keep, float("-inf"))
        nxt = force(pick(mixed, temperature, top_k, top_p, generator), forced, t)  # (n, 1)
        out.append(nxt)
        valid = torch.cat([valid, valid.new_ones(G * n, 1)], dim=1)
        logits, cache = masked_forward(model, nxt.repeat(G, 1), pos, valid, cache)
        pos = pos + 1
    return torch.cat(out, dim=1) if out else ids.new_zeros(n, 0)
