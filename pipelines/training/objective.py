"""The training objective (§3.3, Eq. 2-3): the per-sequence loss over main and retrieved tokens,
its chunked cross-entropy, and the learning-rate schedule (§4.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.document import IMAGE, TEXT
from model.transformer import Transformer
from pipelines.training.sequences import ROLE_MAIN, ROLE_RETRIEVED


def sequence_losses(model: Transformer, batch: dict[str, torch.Tensor], block_mask: bool = True,
                    ce_chunk: int = 0) -> dict[str, torch.Tensor]:
    """L = (sum over main tokens of NLL + alpha * sum over retrieved tokens) / main tokens (Eq. 2-3),
    plus the detached terms to log: L_main, L_retr, text and image NLL of the main documents.
    `block_mask`: each packed example attends only to itself (needs batch["segments"])."""
    segments = batch["segments"][:, :-1] if block_mask and "segments" in batch else None
    nll = token_nll(model, batch["ids"][:, :-1], batch["positions"][:, :-1], batch["ids"][:, 1:],
                    segments, ce_chunk)  # (B, T-1)
    weights, roles, modality = (batch[k][:, 1:] for k in ("weights", "roles", "modality"))
    main = roles == ROLE_MAIN
    out = {"loss": (nll * weights).sum() / main.sum().clamp(min=1)}
    d = nll.detach()
    for name, sel in (("l_main", main), ("l_retr", roles == ROLE_RETRIEVED),
                      ("l_text", main & (modality == TEXT)), ("l_image", main & (modality == IMAGE))):
        out[name] = d[sel].mean() if sel.any() else d.new_tensor(float("nan"))
    out["tokens"] = (roles > 0).sum()
    return out


def token_nll(model: Transformer, ids: torch.Tensor, positions: torch.Tensor,
              targets: torch.Tensor, segments: torch.Tensor | None, ce_chunk: int) -> torch.Tensor:
    """Per-token NLL (B, T) of `targets`; chunked when ce_chunk > 0 (see `chunked_nll`)."""
    if ce_chunk <= 0:
        logits, _ = model(ids, positions, segments=segments)  # (B, T, V)
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    hidden, _ = model.hidden(ids, positions, segments=segments)
    return chunked_nll(hidden, model.head.weight, targets, ce_chunk)


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T, `chunk` tokens at a time. Each chunk's logits (made
    float32 for the softmax) are recomputed in backward instead of saved, so at most one chunk of
    float32 logits exists at any time: memory O(chunk x V), not O(B x T x V)."""
    B, T, C = hidden.shape
    h, t = hidden.reshape(B * T, C), targets.reshape(B * T)
    parts = [checkpoint(_chunk_nll, h[i:i + chunk], weight, t[i:i + chunk], use_reentrant=False)
             for i in range(0, B * T, chunk)]
    return torch.cat(parts).view(B, T)


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ weight.t()).float(), t, reduction="none")


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak, then linear decay to 0 at `total` steps (§4.1)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f
