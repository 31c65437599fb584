"""Sampling from the decoder with its KV cache: temperature, top-k and top-p (nucleus) filtering."""

from __future__ import annotations

from collections.abc import Collection

import torch

from model.transformer import Transformer


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


@torch.no_grad()
def sample(model: Transformer, prompt: torch.Tensor, positions: torch.Tensor, max_new: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           allowed: Collection[int] | None = None, stop: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue prompt (B, T) whose positions are (B, T); returns the new ids (B, <= max_new).

    `allowed` restricts sampling to a set of ids (e.g. image codes while generating an image);
    generation stops once every row has produced `stop`. temperature 0 means greedy.
    """
    model.eval()
    logits, cache = model(prompt, positions)
    pos = positions[:, -1:] + 1  # (B, 1) the next position within the current document
    keep = None
    if allowed is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[list(allowed)] = True
    out, done = [], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new):
        step = logits[:, -1].float()  # (B, V)
        if keep is not None:
            step = step.masked_fill(~keep, float("-inf"))
        nxt = pick(step, temperature, top_k, top_p, generator)  # (B, 1)
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
